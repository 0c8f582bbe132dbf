"""The small GPT (training/gpt.py), its loss and metrics (training/metrics.py), its flags
(training/cli.py), and the central oracles on it: W ranks under DDP equal one process, and
every --sync mode (sharded ones included; compressed ones where lossless) equals ddp, at 2
and 3 ranks (3: `slow`), with --grad-accum 2 and the tied head, in one spawned world per W.

All in float64 on tiny sizes, so a comparison's error is rounding, bounded beside it."""

import math
import random
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from comm.compress import Compression, PowerSGDCompressor
from core.dist import DistEnv
from core.errors import UsageError
from data.text import ByteWindows
from parallel.factory import make_sync
from parallel.flags import SYNC_MODES
from tests.multiproc import run_world
from training.checkpoint import unwrap
from training.cli import check_model_data, make_parser
from training.gpt import GPT, generate, show_sample
from training.metrics import Totals, bits_text, loss_fn, scalars
from training.models import build_model, model_from_args

SMALL = {"vocab": 256, "context": 16, "layers": 2, "width": 32, "heads": 4}


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(**SMALL).double()


def corpus(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Bytes with some structure (a few repeated words), the same on every rank."""
    rng = random.Random(seed)
    words = [b"def ", b"return ", b"self", b"(x)", b":\n    ", b" = ", b"None", b"\n"]
    text = b"".join(rng.choice(words) for _ in range(n))[:n]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


@pytest.mark.oracle
def test_causal_mask_a_future_byte_changes_no_earlier_logit():
    model = small_gpt()
    idx = torch.randint(256, (2, SMALL["context"]), generator=torch.Generator().manual_seed(1))
    j = 9
    changed = idx.clone()
    changed[:, j] = (idx[:, j] + 1) % 256
    a, b = model(idx), model(changed)
    # Exactly equal, not close: positions < j compute the same operations on the same
    # numbers (attention's masked weights are exact zeros), so no rounding can differ.
    assert torch.equal(a[:, :j], b[:, :j])
    assert (a[:, j:] - b[:, j:]).abs().amax(-1).min() > 0  # and position j onwards do see it


@pytest.mark.oracle
def test_tied_head_is_one_parameter_with_the_gradient_of_both_uses():
    model = small_gpt()
    names = [name for name, _ in model.named_parameters()]
    assert names.count("tok") == 1 and not any("head" in n for n in names)
    assert list(model.state_dict()).count("tok") == 1
    idx = torch.tensor([[1, 2, 3, 2, 1, 5, 8, 13]])  # bytes 0, 4, 6, ... never looked up
    labels = torch.roll(idx, -1, 1)

    def loss(tok: torch.Tensor) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, {"tok": tok}, (idx,)), labels)

    tok = model.tok.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(tok), tok)
    # A byte that is never an input gets the head's gradient only, so it is non-zero there:
    assert grad[0].abs().max() > 0
    # and the whole gradient is the derivative of the loss through both uses: a central
    # difference along a random direction d. Error model, float64: truncation h^2/6 |L'''|
    # ~ 1e-12 and rounding eps |L| / h ~ 1e-16 x 6 / 1e-5 ~ 1e-10 against a derivative of
    # order 1e-2; a gradient missing either use (the lookup's rows 1..13, or the head's)
    # is off by far more.
    d = torch.randn(tok.shape, generator=torch.Generator().manual_seed(2), dtype=tok.dtype)
    h = 1e-5
    with torch.no_grad():
        numeric = (loss(tok + h * d) - loss(tok - h * d)) / (2 * h)
    assert (grad * d).sum().item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)

    # The two uses apart, each with the other's weight detached (the forward written out):
    # their sum is the gradient, and each is a real part of it.
    def use(lookup: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        x = F.embedding(idx, lookup) + model.pos[:8]
        for block in model.blocks:
            x = block(x)
        return loss_fn(F.linear(model.ln(x), head), labels)

    (head_part,) = torch.autograd.grad(use(tok.detach(), tok), tok)
    (lookup_part,) = torch.autograd.grad(use(tok, tok.detach()), tok)
    assert lookup_part.abs().max() > 0 and head_part.abs().max() > 0
    # The same float64 numbers added in another order by autograd: rounding, 1e-15.
    assert (grad - head_part - lookup_part).abs().max() < 1e-12


def test_sizes_come_from_the_flags():
    parser = make_parser("t", "b", 32, "runs/t")
    args = parser.parse_args(
        [
            "--model",
            "gpt",
            "--dataset",
            "stdlib",
            "--gpt-layers",
            "3",
            "--gpt-width",
            "48",
            "--gpt-heads",
            "6",
            "--context",
            "40",
        ]
    )
    check_model_data(args)
    data = type("Spec", (), {"num_classes": 256, "in_channels": 1, "image_size": 40})
    model = model_from_args(args, data)
    assert len(model.blocks) == 3 and model.blocks[0].heads == 6
    assert model.tok.shape == (256, 48) and model.pos.shape == (40, 48)
    defaults = parser.parse_args(["--model", "gpt", "--dataset", "stdlib"])
    assert (defaults.gpt_layers, defaults.gpt_width, defaults.gpt_heads, defaults.context) == (
        4,
        128,
        4,
        128,
    )
    assert isinstance(build_model("gpt", 1, 32, 256), GPT)
    with pytest.raises(ValueError, match="more than the context"):
        model(torch.zeros(1, 41, dtype=torch.long))


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--model gpt --dataset stdlib --gpt-width 50", "not a multiple of --gpt-heads"),
        ("--model gpt --dataset synthetic", "--model gpt reads text"),
        ("--model cnn --dataset stdlib", "is text"),
        ("--model cnn --sample 10", "only --model gpt"),
        ("--model gpt --dataset stdlib --gpt-layers 1000 --gpt-width 4096", "billion parameters"),
    ],
)
def test_bad_pairings_are_one_line(flags, message):
    args = make_parser("t", "b", 32, "runs/t").parse_args(flags.split())
    with pytest.raises(UsageError, match=message):
        check_model_data(args)


@pytest.mark.oracle
def test_loss_accuracy_and_bits_per_byte_of_a_language_model():
    logits = torch.randn(2, 5, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[0, 0] = logits[0, 0].argmax()
    loss = loss_fn(logits, labels)
    by_hand = -sum(
        torch.log_softmax(logits[b, t], 0)[labels[b, t]] for b in range(2) for t in range(5)
    )
    assert loss.item() == pytest.approx(by_hand.item() / 10, rel=1e-12)  # float64 sums of 10
    totals = Totals(torch.device("cpu"))
    totals.add_batch(loss, logits, labels)
    m = totals.reduce()
    right = int((logits.argmax(-1) == labels).sum())
    assert m["count"] == 2 and m["accuracy"] == right / 10 >= 0.1  # 2 windows, 10 tokens
    assert m["bits_per_byte"] == pytest.approx(loss.item() / math.log(2), rel=1e-12)
    assert bits_text(m) == f"  bpb {m['bits_per_byte']:.3f}"
    assert scalars("train", m) == {
        "train/loss": m["loss"],
        "train/accuracy": m["accuracy"],
        "train/bits_per_byte": m["bits_per_byte"],
    }
    # A classifier's metrics are as before: no bits per byte.
    totals.add_batch(loss_fn(logits[:, 0], labels[:, 0]), logits[:, 0], labels[:, 0])
    classifier = totals.reduce()
    assert classifier["count"] == 2 and "bits_per_byte" not in classifier
    assert bits_text(classifier) == ""


def test_generation_is_deterministic_and_greedy_at_temperature_zero():
    model = small_gpt()
    a = generate(model, b"def ", 20, temperature=0.8, seed=3)
    assert len(a) == 20 and a == generate(model, b"def ", 20, temperature=0.8, seed=3)
    greedy = generate(model, b"def ", 20, temperature=0)  # longer than the context of 16
    ids = list(b"def ")
    for _ in range(20):
        ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert greedy == bytes(ids[4:])


# ---- the oracles: 1 process vs 2 and 3 ranks, and every --sync mode vs ddp, in float64

GLOBAL_BATCH, ACCUM, STEPS, LR, MOMENTUM = 12, 2, 4, 0.1, 0.9
BUCKET = 2**14  # bytes: allreduce's and overlap's buckets, ~9 of them for the small gpt
# name: (--sync mode, make_sync's options, SGD momentum). Each run is compared with the ddp
# run of the same momentum. local-sgd and diloco are compared where they reduce to DDP's
# step: local-sgd with K = 1 and diloco with H = 1, outer lr 1 and no outer momentum, each
# inner step plain SGD (theta - lr x mean(g) either way). Left out: the bf16/fp16 casts and
# PowerSGD below full rank (lossy by design: the cast rounds every gradient to 8 or 11 bits,
# ~1e-3 relative; their twins are compared in tests/test_comm_compress.py), local-sgd K > 1
# and diloco H > 1 (not DDP's trajectory: tests/test_parallel_sync.py, test_parallel_diloco.py),
# --param-dtype (tests/test_parallel_mixed_precision.py) and --transport shm / --topology (the
# same modes with another all-reduce: tests/test_parallel_sync.py, test_comm_topology.py).
DILOCO_AS_SGD = {"outer_lr": 1.0, "outer_momentum": 0.0}
RUNS = {
    "ddp": ("ddp", {}, MOMENTUM),
    "allreduce": ("allreduce", {"bucket_bytes": BUCKET}, MOMENTUM),
    "overlap": ("overlap", {"bucket_bytes": BUCKET}, MOMENTUM),
    "zero1": ("zero1", {}, MOMENTUM),
    "zero2": ("zero2", {}, MOMENTUM),
    "zero3": ("zero3", {}, MOMENTUM),
    "torch-zero1": ("torch-zero1", {}, MOMENTUM),
    "fsdp2": ("fsdp2", {}, MOMENTUM),
    # hsdp and torch-hsdp shard inside each node of --topology: at 2 and 3 ranks the layouts
    # are one node of W (zero3's sharding) or W nodes of one (all-reduces across nodes only);
    # tests/test_parallel_hsdp.py has 2 x 2. "{W}" is the world size.
    "hsdp-1xW": ("hsdp", {"topology": "1x{W}"}, MOMENTUM),
    "hsdp-Wx1": ("hsdp", {"topology": "{W}x1"}, MOMENTUM),
    "torch-hsdp-1xW": ("torch-hsdp", {"topology": "1x{W}"}, MOMENTUM),
    "torch-hsdp-Wx1": ("torch-hsdp", {"topology": "{W}x1"}, MOMENTUM),
    # --comm-hook powersgd at rank 32 = the width: torch's rule compresses no matrix that
    # (n + m) r x 2 >= n m, so every gradient goes through the hook's uncompressed all-reduce.
    "ddp-powersgd-hook": (
        "ddp", {"compression": Compression(comm_hook="powersgd", powersgd_rank=32)}, MOMENTUM
    ),
    # The row above fits in one DDP bucket (the small gpt is ~0.3 MB, DDP's first bucket 1 MiB)
    # and compresses nothing. This one compresses every matrix, at full rank (the hook's
    # min_compression_rate 0, set in train_mode: lossless as below), in buckets of BUCKET
    # bytes: several buckets, whose P and Q all-reduces torch's hook alone issues in an order
    # that differs between gloo ranks (comm/compress.py's one_bucket_at_a_time).
    "ddp-powersgd-hook-buckets": (
        "ddp",
        {"bucket_bytes": BUCKET,
         "compression": Compression(comm_hook="powersgd", powersgd_rank=256)},
        MOMENTUM,
    ),
    # --compress powersgd at full rank on every matrix (the compressor's min_compression_rate
    # 0, set in train_mode): P Q^T = P P^T mean(M) = mean(M), lossless up to rounding.
    "allreduce-powersgd-full-rank": (
        "allreduce", {"compression": Compression(compress="powersgd", powersgd_rank=256)}, MOMENTUM
    ),
    "ddp-plain-sgd": ("ddp", {}, 0.0),
    "local-sgd": ("local-sgd", {"sync_every": 1}, 0.0),
    "diloco": ("diloco", {"sync_every": 1, "diloco": DILOCO_AS_SGD}, 0.0),
}  # fmt: skip
ORACLE = {name: "ddp-plain-sgd" if run[2] == 0 else "ddp" for name, run in RUNS.items()}


def loader(rank: int, world_size: int):
    """GLOBAL_BATCH windows per micro-batch, split over the ranks by DistributedSampler."""
    data = ByteWindows(corpus(), SMALL["context"])
    sampler = DistributedSampler(data, world_size, rank, shuffle=True, seed=0, drop_last=True)
    return iter(DataLoader(data, GLOBAL_BATCH // world_size, sampler=sampler, drop_last=True))


def one_process() -> dict[str, torch.Tensor]:
    """STEPS SGD steps of the small GPT in one process, each of ACCUM micro-batches of
    GLOBAL_BATCH windows: the oracle of the ranks' ddp run."""
    torch.set_num_threads(1)
    model, batches = small_gpt(), loader(0, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for _ in range(STEPS):
        for _ in range(ACCUM):
            x, y = next(batches)
            (loss_fn(model(x), y) / ACCUM).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_mode(rank: int, world_size: int, name: str) -> dict[str, torch.Tensor]:
    """The same steps on this rank's share of each micro-batch, synchronised by RUNS[name]:
    the micro-steps but the last under sync.no_sync(), as train_ddp.py does."""
    mode, options, momentum = RUNS[name]
    if "topology" in options:
        options = {**options, "topology": options["topology"].format(W=world_size)}
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    sync, batches = make_sync(mode, small_gpt(), env, **options), loader(rank, world_size)
    if name == "allreduce-powersgd-full-rank":
        sync.compressor = PowerSGDCompressor(rank=256, min_compression_rate=0)
    if name == "ddp-powersgd-hook-buckets":
        sync.hook_state.min_compression_rate = 0
    optimizer = sync.make_optimizer(torch.optim.SGD, dict(lr=LR, momentum=momentum))
    for _ in range(STEPS):
        for micro in range(ACCUM):
            x, y = next(batches)
            with nullcontext() if micro == ACCUM - 1 else sync.no_sync():
                (loss_fn(sync.model(x), y) / ACCUM).backward()
        sync.finish_backward()
        optimizer.step()
        sync.after_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    if name == "ddp-powersgd-hook-buckets":  # the hook's memory: one Q per compressed bucket
        assert len(sync.hook_state.q_memory_dict) > 1, "one bucket: the row tests nothing new"
    with sync.consolidated(optimizer):
        state = unwrap(sync.model).state_dict()
        return {k: v.detach().clone() for k, v in state.items()}


def every_mode(rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    return {name: train_mode(rank, world_size, name) for name in RUNS}


# The 3-rank world is `slow`: its 17 runs cost ~10 s more on the 2-core box (fsdp2's and the
# 2-D meshes' first use among them), past the default suite's budget.
@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)])
def ranks(request) -> tuple[int, list[dict]]:
    """One world per W runs every mode: spawning and importing torch is most of the cost."""
    return request.param, run_world(every_mode, request.param, timeout=240)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and "tok" in a  # the tied head: one entry
    assert all(a[k].dtype == b[k].dtype == torch.float64 for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Error model, for both tests below: each rank's mean loss over its own tokens, then an
# average over the ranks (DDP's buckets, a mode's buckets, shards or a reduce-scatter; local
# SGD and DiLoCo average parameters that differ from the average by lr x g), sums the same
# float64 terms in another order than one process or DDP: a relative ~1e-15 per gradient
# element (full-rank PowerSGD adds two products and a Gram-Schmidt, each a few ulps of |M|
# times the condition of P). The model is smooth (GELU, softmax, LayerNorm: no kink for a
# rounding to cross), so 4 momentum steps of lr 0.1 carry that into parameter differences
# of ~1e-15: the largest measured is printed with -s. 1e-10 leaves 10^5 of room and still
# catches any gradient that is not the global batch's: a wrong shard, one micro-batch
# dropped, the tied head's gradient reduced twice or only one of its two uses, differences
# of order lr x |grad| ~ 1e-3.
TOLERANCE = 1e-10


@pytest.mark.oracle
def test_two_and_three_ranks_equal_one_process_in_float64(ranks):
    world_size, results = ranks
    single = one_process()
    assert max_diff(single, small_gpt().state_dict()) > 1e-3, "training moved nothing"
    for r, rank in enumerate(results):
        diff = max_diff(rank["ddp"], single)
        assert diff <= TOLERANCE, f"W={world_size} rank {r}: ddp differs by {diff:.3g}"


@pytest.mark.oracle
def test_every_sync_mode_equals_ddp_in_float64(ranks):
    world_size, results = ranks
    # Every --sync mode is here: a new one fails until it joins RUNS or the list left out above.
    assert {mode for mode, _, _ in RUNS.values()} == set(SYNC_MODES)
    worst = 0.0
    for name in RUNS:
        for r, rank in enumerate(results):
            diff = max_diff(rank[name], rank[ORACLE[name]])
            worst = max(worst, diff)
            assert diff <= TOLERANCE, f"W={world_size} {name} rank {r}: {diff:.3g} from ddp"
    moved = max_diff(results[0]["ddp-plain-sgd"], small_gpt().state_dict())
    assert moved > 1e-3, "plain SGD moved nothing"
    print(f"W={world_size}: largest difference from ddp {worst:.2e}")


def test_sample_is_written_on_rank_zero_only_through_a_wrapper():
    model = small_gpt()
    args = make_parser("t", "b", 32, "runs/t").parse_args(
        ["--model", "gpt", "--dataset", "stdlib", "--sample", "12", "--temperature", "0"]
    )
    lines = []
    wrapped = torch.nn.Module()  # a stand-in for DataParallel and DDP, which never asks for CUDA
    wrapped.module = model  # where they keep the model: show_sample unwraps it
    text = show_sample(wrapped, args, True, lambda *a: lines.append(a[0] % a[1:]))
    assert text == generate(model, b"\n", 12, temperature=0).decode("utf-8", errors="replace")
    assert len(lines) == 1 and lines[0].endswith(text)
    assert show_sample(wrapped, args, False, lines.append) is None and len(lines) == 1
