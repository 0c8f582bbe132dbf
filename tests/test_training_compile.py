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
from parallel.factory import make_sync
from tests.multiproc import run_world
from training.checkpoint import unwrap
from training.compiled import maybe_compile

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
