"""One gradient synchronisation with and without compression, timed alone.

    python -m benchmarks.bench_compress_sync                 # 2 gloo ranks, cnn and resnet18
    python -m benchmarks.bench_compress_sync --models cnn,gpt   # the small GPT (make bench)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_compress_sync

For each model, the gradients of its parameters (random values, the model's shapes) are
averaged over the ranks by each hand-made compressor of comm/compress.py, the way `--sync
allreduce --compress KIND` does after backward: `none` is the plain flat all-reduce, then the
fp16 and bf16 casts and PowerSGD at each --ranks (error feedback on, after its two plain
warm-up steps). Reported: the payload bytes one rank all-reduces (from comm/tracer.py) and
the time of one synchronisation, compression and decompression included, fastest of
--rounds rounds of --steps calls, slowest rank. Without the training around it, this is
what compression can save or cost per step, on this machine's link (here: loopback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.workload import BENCH_MODELS, model_named
from comm import compress
from comm.tracer import CommTracer
from core.cli import Parser, positive
from core.dist import DistEnv, distributed, rank0_logger
from core.errors import run_cli
from study.bench import add_world_flags, launch, rank_backend
from training.cli import add_gpt_size_flags


def rank_list(value: str) -> list[int]:
    try:
        return [positive(v) for v in value.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4, got {value}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument(
        "--models",
        type=lambda v: v.split(","),
        default=["cnn", "resnet18"],
        help=f"comma-separated, of {', '.join(BENCH_MODELS)} (gpt: sized by the flags below)",
    )
    p.add_argument("--ranks", type=rank_list, default=[1, 4], help="PowerSGD ranks, e.g. 1,4")
    p.add_argument("--steps", type=positive, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=positive, default=5, help="rounds; the fastest is reported")
    add_world_flags(p)
    add_gpt_size_flags(p.add_argument_group("--models gpt (training/gpt.py)"))
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in BENCH_MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}")
    return args


def compressors(ranks: list[int]) -> dict[str, compress.Compressor]:
    made = {"none": compress.Compressor()}
    made |= {k: compress.CastCompressor(dtype) for k, dtype in compress.CAST_DTYPES.items()}
    made |= {f"powersgd-r{r}": compress.PowerSGDCompressor(r) for r in ranks}
    return made


def time_one(
    compressor: compress.Compressor, grads: list[torch.Tensor], args
) -> tuple[float, float]:
    """(payload bytes of one call, fastest round's seconds per call over the slowest rank)."""
    for _ in range(compress.START_ITER + 1):  # PowerSGD's plain steps, then one to warm up
        compressor.all_reduce_mean(grads)
    with CommTracer() as tracer:
        compressor.all_reduce_mean(grads)
        sent = tracer.end_step()["comm/bytes"]
    best = float("inf")
    for _ in range(args.rounds):
        dist.barrier()
        tic = time.perf_counter()
        for _ in range(args.steps):
            compressor.all_reduce_mean(grads)
        elapsed = torch.tensor([(time.perf_counter() - tic) / args.steps], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        best = min(best, elapsed.item())
    return sent, best


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        own_argv = sys.argv[1:] if argv is None else argv
        raise SystemExit(
            launch("benchmarks.bench_compress_sync", own_argv, args.backend, args.nproc)
        )
    with distributed(rank_backend(args.backend)) as env:
        report(args, env)


def report(args: argparse.Namespace, env: DistEnv) -> None:
    log = rank0_logger(env).info
    log(f"{env.world_size} {env.backend} rank(s); one synchronisation of the model's gradients, "
        f"fastest of {args.rounds} x {args.steps}, slowest rank")  # fmt: skip
    log(f"{'model':9s} {'compress':12s} {'bytes':>10s} {'vs fp32':>7s} {'ms':>8s} {'vs none':>7s}")
    for name in args.models:
        torch.manual_seed(0)
        model = model_named(name, args).to(env.device)
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        full = sum(s.numel() for s in shapes) * 4
        base = None
        for kind, compressor in compressors(args.ranks).items():
            gen = torch.Generator().manual_seed(env.rank)
            grads = [torch.randn(s, generator=gen).to(env.device) for s in shapes]
            sent, seconds = time_one(compressor, grads, args)
            base = base or seconds
            log(f"{name:9s} {kind:12s} {sent:10.0f} {sent / full:7.3f} {1e3 * seconds:8.2f} "
                f"{seconds / base:7.2f}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
