"""--compile (training/compiled.py) at the Sync level: the compiled model trains like the
eager one, under DDP and under the hand-made modes' hooks, and DDP's graph is cut at its
buckets.

One world of 2 ranks trains a float64 MLP of four Linear layers for 3 SGD steps, eager and
compiled, with --sync ddp (a 1 MiB bucket cap) and zero1 (`slow`: overlap too, whose
post-accumulate-grad hooks fire after the compiled backward). The default suite compiles
with the "aot_eager" backend: dynamo's graph capture, DDPOptimizer's split and AOT
autograd's joint forward/backward are the real ones, but the ops run as aten's eager kernels
(no C++ build, which costs minutes on a cold 2-core box), so the parameters must be
identical. The `slow` test compiles with inductor, whose generated kernels may fuse and
reassociate sums (error model beside it).

`slow` as well: the small gpt of tests/test_training_gpt.py (tied head), compiled with
aot_eager, equals eager bit for bit in float64 under ddp and zero1, and compiled with
inductor in float32 follows eager's loss curve within float32's own rounding; and
train_ddp.py with --compile --compiled-autograd (DDP's Python reducer traced by compiled
autograd) equals eager train_ddp.py in float64 at 2 and 3 ranks.

DDPOptimizer's buckets have a closed form: walking the parameters from the output back, a
bucket closes once it holds at least its cap (the first 1 MiB, the others DDP's
bucket_cap_mb). For this model in float64 (from the output: 8,224 + 526,336 + 526,336 B,
then 34,816 B) that is 2 buckets, so dynamo captures 1 graph and compiles 2 pieces.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from core.dist import DistEnv
from core.errors import UsageError
from data.text import ByteWindows
from parallel.factory import make_sync
from tests.multiproc import run_world
from tests.test_training_gpt import SMALL, corpus, small_gpt
from training.checkpoint import load_checkpoint, unwrap
from training.cli import check_compiled_autograd
from training.compiled import maybe_compile
from training.metrics import loss_fn

MODES = ("ddp", "overlap", "zero1")
CAP = 2**20  # DDP's bucket cap here, and DDPOptimizer's first bucket
STEPS, LR, MOMENTUM = 3, 0.1, 0.9


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
        nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4),
    ).double()  # fmt: skip


def buckets_by_formula(net: nn.Module, cap: int) -> int:
    count, size = 1, 0
    for p in reversed(list(net.parameters())):
        if size >= cap:
            count, size = count + 1, 0
        size += p.numel() * p.element_size()
    return count


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train(rank: int, world_size: int, mode: str, backend: str | None) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compile afresh: the modes' models are alike, guards would pass
    counters.clear()
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    sync = make_sync(mode, model(), env, bucket_bytes=CAP if mode != "zero1" else None)
    opt = sync.make_optimizer(torch.optim.SGD, dict(lr=LR, momentum=MOMENTUM))
    if backend is not None:
        maybe_compile(sync.model, argparse.Namespace(compile=True), backend=backend)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(8, 16, generator=g, dtype=torch.float64)
        sync.model(x).tanh().pow(2).mean().backward()
        sync.finish_backward()
        opt.step()
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
    out = {
        "graphs": counters["stats"]["unique_graphs"],
        "pieces": counters["aot_autograd"]["total"],
        "breaks": sum(counters["graph_break"].values()),
    }
    with sync.consolidated(opt):
        out["params"] = {k: v.clone() for k, v in unwrap(sync.model).state_dict().items()}
    return out


def world(rank: int, world_size: int, backend: str, modes: tuple[str, ...]) -> dict:
    lines = Lines()
    logger = logging.getLogger("torch._dynamo.backends.distributed")
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    results = {}
    for mode in modes:
        results[mode, "eager"] = train(rank, world_size, mode, None)
        results[mode, "compiled"] = train(rank, world_size, mode, backend)
        dist.barrier()
    results["ddp_optimizer"] = [line.strip() for line in lines.lines if "buckets" in line]
    return results


def check(results: list[dict], modes: tuple[str, ...], tolerance: float) -> None:
    expected = buckets_by_formula(model(), CAP)
    assert expected == 2
    for rank in results:
        for mode in modes:
            eager, compiled = rank[mode, "eager"], rank[mode, "compiled"]
            assert eager["graphs"] == 0 and compiled["graphs"] == 1, mode  # one whole graph
            assert compiled["breaks"] == 0, mode
            moved = max(
                (eager["params"][k] - model().state_dict()[k]).abs().max() for k in eager["params"]
            )
            assert moved > 1e-3
            diff = max(
                (eager["params"][k] - compiled["params"][k]).abs().max().item()
                for k in eager["params"]
            )
            assert diff <= tolerance, (mode, diff)
        # DDP: the graph cut at the buckets.
        assert rank["ddp", "compiled"]["pieces"] == expected
        assert rank["ddp_optimizer"] == [
            f"DDPOptimizer used bucket cap {CAP} and created {expected} buckets. "
            "Enable debug logs for detailed bucket info."
        ]
        for mode in modes[1:]:  # no DDP: one piece, not split
            assert rank[mode, "compiled"]["pieces"] == 1, mode


@pytest.mark.oracle
def test_compiled_equals_eager_aot_eager():
    modes = ("ddp", "zero1")  # the default suite: ~10 s of compiling per mode on 2 busy cores
    check(run_world(world, 2, "aot_eager", modes, timeout=300, pg_timeout=240), modes, 0.0)


# Error model for inductor: its generated C++ kernels fuse the pointwise ops (exact: the same
# float64 operations, each rounded once, no FMA contraction across ops in its default C++
# build) and may compute the sums (the bias gradients over the batch of 8, the loss's mean)
# in another order: each such sum of n terms differs by at most (n - 1) x 2^-53 x the sum of
# the terms' magnitudes, ~1e-15 here (gradients below 1), and 3 SGD steps with momentum turn
# that into at most lr x (3 + 2 mu + mu^2) = 0.56 times it. The matrix products call the same
# BLAS as eager. 1e-12 leaves three orders of magnitude above it.
@pytest.mark.slow
@pytest.mark.oracle
def test_compiled_equals_eager_inductor():
    check(run_world(world, 2, "inductor", MODES, timeout=900, pg_timeout=600), MODES, 1e-12)


def test_refusals_and_no_flag():
    net = model()
    maybe_compile(net, argparse.Namespace(compile=False))  # no flag: nothing happens
    assert net._compiled_call_impl is None
    with pytest.raises(UsageError, match="--compile does not combine with --sync fsdp2"):
        maybe_compile(net, argparse.Namespace(compile=True, sync="fsdp2"))
    with pytest.raises(UsageError, match="--compile does not combine with --sync torch-hsdp"):
        maybe_compile(net, argparse.Namespace(compile=True, sync="torch-hsdp"))


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("ddp", "--compiled-autograd", "it goes with --compile"),
        ("ddp", "--compile --compiled-autograd --sync zero1", "not --sync zero1"),
        ("dp", "--compile --compiled-autograd", "not train_dp.py"),
        ("ddp", "--compile --compiled-autograd --comm-hook bf16", "take a bucket"),
        ("ddp", "--compile --compiled-autograd --find-unused-parameters", "wait for it"),
    ],
)
def test_compiled_autograd_refusals_are_one_line(script, flags, message):
    import train_ddp
    import train_dp

    args = {"ddp": train_ddp, "dp": train_dp}[script].parse_args(flags.split())
    with pytest.raises(UsageError, match=message):
        check_compiled_autograd(args)
    ok = train_ddp.parse_args(["--compile", "--compiled-autograd"])
    check_compiled_autograd(ok)


# ---- --compiled-autograd: DDP's Python reducer traced into the compiled backward

# train_ddp.py itself, in-process on each rank (tests/test_parallel_sync.py's way): the mlp
# in float64, --grad-accum 2 (a no_sync micro-step, then a synchronising one), 3 steps.
SCRIPT = [
    "--model", "mlp", "--train-size", "48", "--eval-size", "4", "--batch-size", "4",
    "--grad-accum", "2", "--epochs", "1", "--max-steps", "3", "--no-eval",
    "--log-every", "1000", "--dtype", "float64",
]  # fmt: skip
# Error model: aot_eager runs eager's kernels on the same graph, so forward and the local
# gradients are the same numbers; what differs is the reduction. DDP's C++ reducer divides a
# bucket by W and all-reduces it; the Python reducer divides each gradient by W and
# all-reduces it alone. At W = 2 a sum of two halves is exact either way (0 expected, and
# measured); at W = 3 gloo's ring adds the three terms in an order that depends on the
# element's offset in the buffer: a few ulps (1e-16 relative) per step, carried through 3
# SGD steps with momentum into ~1e-16 on parameters below 1 (measured 1.4e-17). 1e-12 is
# 10^4 above that; a gradient not averaged (the reducer bypassed) moves the parameters by
# lr x |g| ~ 1e-3.
CA_TOLERANCE = 1e-12


def script_runs(rank: int, world_size: int, out_root: str) -> dict:
    """train_ddp.py eager, then with --compile --compiled-autograd, and eager again (torch's
    setting put back). The compile backend: aot_eager, recording how many all-reduces each
    graph handed to it holds (the forward's, then compiled autograd's backward graphs)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import train_ddp
    from training import compiled

    all_reduces: list[int] = []

    def recording(gm: torch.fx.GraphModule, inputs):
        all_reduces.append(sum("all_reduce" in str(n.target) for n in gm.graph.nodes))
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    lines = Lines()
    logging.getLogger("torch._dynamo.backends.distributed").setLevel(logging.INFO)
    logging.getLogger("torch._dynamo.backends.distributed").addHandler(lines)
    out = {}
    for name, flags in [("eager", []), ("ca", ["--compile", "--compiled-autograd"])]:
        torch._dynamo.reset()
        counters.clear()
        compiled.BACKEND = recording
        try:
            train_ddp.main([*SCRIPT, *flags, "--out-dir", f"{out_root}/{name}"])
        finally:
            compiled.BACKEND = "inductor"
        out[name] = {
            "model": load_checkpoint(f"{out_root}/{name}/checkpoint.pt")["model"],
            "captures": counters["compiled_autograd"]["captures"],
            "optimize_ddp": torch._dynamo.config.optimize_ddp,
        }
    out["all_reduces"] = all_reduces
    out["ddp_optimizer_lines"] = lines.lines
    return out


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("world_size", [2, 3])
def test_compiled_autograd_equals_eager_through_train_ddp(world_size, tmp_path):
    results = run_world(script_runs, world_size, str(tmp_path), timeout=600, pg_timeout=500)
    worst = 0.0
    for rank in results:
        eager, ca = rank["eager"], rank["ca"]
        assert eager["captures"] == 0 and eager["optimize_ddp"] is True
        # It took effect: compiled autograd captured two backward graphs, the no_sync
        # micro-step's without communication and the synchronising one with an all-reduce
        # per parameter (DDP's Python reducer); the forward is one graph without any, and
        # DDPOptimizer cut nothing.
        n_params = len(eager["model"])
        assert ca["captures"] == 2 and ca["optimize_ddp"] == "python_reducer"
        assert sorted(rank["all_reduces"])[0] == 0 and max(rank["all_reduces"]) == n_params
        assert rank["ddp_optimizer_lines"] == []
        diff = max((ca["model"][k] - v).abs().max().item() for k, v in eager["model"].items())
        worst = max(worst, diff)
        assert diff <= CA_TOLERANCE, diff
    print(f"W={world_size}: train_ddp.py --compiled-autograd vs eager {worst:.2e}")


# ---- --model gpt: the small gpt of tests/test_training_gpt.py, compiled and eager

CURVE_STEPS = 30


def train_gpt(
    rank: int, world_size: int, mode: str, backend: str | None, dtype: torch.dtype, steps: int
) -> dict:
    """`steps` SGD steps of the small gpt (tied head) on the byte corpus of
    tests/test_training_gpt.py, each rank its own 4 windows per step; the losses and the
    parameters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    sync = make_sync(mode, small_gpt().to(dtype), env)
    opt = sync.make_optimizer(torch.optim.SGD, dict(lr=LR, momentum=MOMENTUM))
    if backend is not None:
        maybe_compile(sync.model, argparse.Namespace(compile=True), backend=backend)
    data = ByteWindows(corpus(), SMALL["context"])
    losses = []
    for step in range(steps):
        first = 4 * (step * world_size + rank)
        x, y = (torch.stack(t) for t in zip(*(data[first + i] for i in range(4)), strict=True))
        loss = loss_fn(sync.model(x), y)
        loss.backward()
        sync.finish_backward()
        opt.step()
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out = {
        "losses": losses,
        "graphs": counters["stats"]["unique_graphs"],
        "pieces": counters["aot_autograd"]["total"],
        "breaks": sum(counters["graph_break"].values()),
    }
    with sync.consolidated(opt):
        out["params"] = {k: v.clone() for k, v in unwrap(sync.model).state_dict().items()}
    return out


def gpt_world(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    f32, f64 = torch.float32, torch.float64
    results = {}
    for mode in ("ddp", "zero1"):
        results[mode, "eager"] = train_gpt(rank, world_size, mode, None, f64, STEPS)
        results[mode, "aot_eager"] = train_gpt(rank, world_size, mode, "aot_eager", f64, STEPS)
    for name, backend, dtype in [("eager32", None, f32), ("eager64", None, f64),
                                 ("inductor32", "inductor", f32)]:  # fmt: skip
        results[name] = train_gpt(rank, world_size, "ddp", backend, dtype, CURVE_STEPS)
    return results


@pytest.fixture(scope="module")
def gpt_runs() -> list[dict]:
    return run_world(gpt_world, 2, timeout=900, pg_timeout=800)


# Error model, aot_eager: the captured graph runs eager's own aten kernels, forward and AOT
# autograd's backward (the same derivative formulas autograd uses: SDPA's, LayerNorm's,
# GELU's and the embedding's backward ops, the tied weight's two gradients added by the
# same AccumulateGrad), so every float64 number is the one eager computes: equal, bit for
# bit (measured), under any ATEN_CPU_CAPABILITY since both sides call the same kernel.
@pytest.mark.slow
@pytest.mark.oracle
def test_gpt_compiled_equals_eager_in_float64(gpt_runs):
    for rank in gpt_runs:
        for mode in ("ddp", "zero1"):  # DDP's reducer, and a hand-made mode's
            eager, compiled = rank[mode, "eager"], rank[mode, "aot_eager"]
            assert compiled["graphs"] == 1 and compiled["breaks"] == 0, mode
            # The small gpt is 267 KiB of float64 parameters, under DDPOptimizer's first
            # bucket of 1 MiB: one bucket, one piece, under ddp as under zero1.
            assert compiled["pieces"] == buckets_by_formula(small_gpt(), CAP) == 1, mode
            moved = max(
                (eager["params"][k] - v).abs().max() for k, v in small_gpt().state_dict().items()
            )
            assert moved > 1e-3
            for k, v in eager["params"].items():
                assert torch.equal(compiled["params"][k], v), (mode, k)


# Error model, inductor in float32: its kernels fuse the pointwise ops and may sum in another
# order (LayerNorm's and softmax's reductions over 32 and 16 terms, the bias and embedding
# gradients over 64 tokens, the loss's mean), so each step's gradient differs from eager's by
# float32 rounding (~1e-7 relative), and the trajectories drift apart as slowly as rounding
# alone moves them. That yardstick is measured in the same run: float32 eager against float64
# eager, the whole of float32's rounding. Compiled must stay within 10 times it (measured:
# printed with -s), while a wrong gradient would move the loss by far more (a step of
# lr x |g| ~ 1e-2 changes the next loss by ~1e-2).
@pytest.mark.slow
@pytest.mark.oracle
def test_gpt_compiled_float32_loss_curve_within_rounding(gpt_runs):
    for rank in gpt_runs:
        e32, e64, c32 = (rank[k]["losses"] for k in ("eager32", "eager64", "inductor32"))
        assert e64[-1] < e64[0] - 0.5, "the curve must fall for the comparison to mean much"
        noise = max(abs(a - b) for a, b in zip(e32, e64, strict=True))
        drift = max(abs(a - b) for a, b in zip(c32, e32, strict=True))
        print(f"float32 vs float64 eager {noise:.2e}, inductor vs eager float32 {drift:.2e}")
        assert 0 < noise < 1e-3
        assert drift <= 10 * noise
