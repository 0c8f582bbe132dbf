"""Sync modes against DDP, and communicate() against one all-reduce per tensor.

    python -m benchmarks.bench_sync              # starts its ranks itself, through torchrun
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_sync

Started without torchrun, it picks a world that fits the machine as study/bench.py does: one
NCCL rank per GPU with two GPUs or more, else 2 gloo ranks on CPU; --backend and --nproc
override that.

1. Step time of every `--sync` mode (and of no communication at all) on the same model and
   the same fixed batch: forward, backward, gradient synchronisation, SGD step. Reported as
   the ratio to `ddp`. `--model gpt` times the small language model on windows of text
   (benchmarks/workload.py); `--bucket-cap-mb` sets the buckets of ddp, allreduce and
   overlap (`make bench` uses 1 MiB on the gpt, so that overlap has 4 to send).
2. The cost of synchronising ~100 small tensors (a stack of 50 Linear layers: 100 weight and
   bias tensors): one blocking all-reduce per tensor, one asynchronous all-reduce per tensor
   (all launched, then all waited for), communicate() with one flat buffer, and
   communicate() with buckets. Reported as the speed-up over one all-reduce per tensor.

Each variant runs --steps times per round, for --rounds rounds; within a round the variants
take turns (in a rotating order), so a slow patch of a shared machine hits all of them. A
round's time is the slowest rank's (a synchronous job runs at its pace), and the reported
time is the fastest round: other jobs on the machine only ever add time, so the fastest
round is the best estimate of what the variant itself costs. Compare rows of one run only.
The table goes to stdout, the rows to <out-dir>/bench_sync.csv and bar charts to
<out-dir>/bench_sync.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from benchmarks.workload import Workload, add_model_flags, workload
from comm.communicate import communicate
from core.cli import Parser, positive, positive_float
from core.dist import DistEnv, choose_threads, distributed, rank0_logger
from core.errors import run_cli
from parallel.base import Sync
from parallel.factory import SHARDED_MODES, SYNC_MODES, make_sync
from study.bench import add_world_flags, launch_unless_ranked, rank_backend


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    add_model_flags(p)
    p.add_argument("--batch-size", type=positive, default=32, help="samples per rank per step")
    p.add_argument(
        "--bucket-cap-mb",
        type=positive_float,
        default=None,
        help="gradient bucket cap of ddp, allreduce and overlap, MiB (unset: DDP's 25, and 1 "
        "for the first bucket)",
    )
    p.add_argument("--steps", type=positive, default=10, help="timed steps per mode per round")
    p.add_argument("--rounds", type=positive, default=7, help="rounds; the fastest is reported")
    p.add_argument("--warmup", type=positive, default=3, help="untimed steps per mode first")
    p.add_argument(
        "--sync-every",
        type=positive,
        default=4,
        help="K of the local-sgd and diloco rows (steps per sync)",
    )
    p.add_argument(
        "--layers",
        type=positive,
        default=50,
        help="Linear layers in the small-tensor model (2 tensors each)",
    )
    p.add_argument("--width", type=positive, default=64, help="features of those layers")
    p.add_argument(
        "--bucket-kib",
        type=positive,
        default=128,
        help="bucket size of the bucketed communicate() row, KiB",
    )
    add_world_flags(p)
    p.add_argument("--out-dir", default="bench_out", help="where the CSV and the PNG go")
    return p.parse_args(argv)


def slowest(seconds: float, device: torch.device) -> float:
    """The slowest rank's time: a synchronous job runs at the pace of its slowest rank."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def rounds_of(
    variants: dict[str, Callable[[], None]], rounds: int, repeats: int, env: DistEnv
) -> dict[str, float]:
    """Seconds per call of each variant in its fastest round; rounds interleave the variants."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(  # for a person at a terminal; a pipe or a log gets the table only
        total=rounds * len(names),
        desc=f"{len(names)} variants x {rounds} rounds",
        leave=False,
        disable=not (env.is_main and sys.stderr.isatty()),
    )
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            bar.update()
            fn = variants[name]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(slowest((time.perf_counter() - start) / repeats, env.device))
    bar.close()
    return {name: min(times[name]) for name in names}


class NoSync(Sync):
    """No communication at all: each rank trains alone. The floor for every mode."""


def bucket_bytes(args: argparse.Namespace, mode: str) -> int | None:
    """--bucket-cap-mb for the modes with gradient buckets (None: the mode's default)."""
    if args.bucket_cap_mb is None or mode not in ("ddp", "allreduce", "overlap"):
        return None
    return int(args.bucket_cap_mb * 2**20)


def bench_sync_modes(
    args: argparse.Namespace, env: DistEnv, work: Workload
) -> tuple[dict[str, float], int]:
    """Seconds per step of every mode, and how many buckets overlap (and DDP) launch."""

    def step_fn(sync: Sync) -> Callable[[], None]:
        optimizer = torch.optim.SGD(sync.model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            work.loss(sync.model).backward()
            sync.finish_backward()
            optimizer.step()
            sync.after_step(optimizer)

        return step

    variants = {}
    # The sharded modes step only their own shard: benchmarks/bench_zero.py measures them.
    for mode in ("none", *(m for m in SYNC_MODES if m not in SHARDED_MODES)):
        torch.manual_seed(0)
        model = work.build().to(env.device)
        if mode == "none":
            sync = NoSync(model)
        else:
            every = args.sync_every if mode in ("local-sgd", "diloco") else None
            sync = make_sync(
                mode, model, env, sync_every=every, bucket_bytes=bucket_bytes(args, mode)
            )
        label = f"{mode} K={args.sync_every}" if mode in ("local-sgd", "diloco") else mode
        variants[label] = step_fn(sync)
        for _ in range(args.warmup):
            variants[label]()
        if mode == "overlap":  # rebuilt after the first backward, in DDP's ready order
            buckets = len(sync.buckets)
    return rounds_of(variants, args.rounds, args.steps, env), buckets


def bench_communicate(args: argparse.Namespace, env: DistEnv) -> tuple[dict[str, float], str]:
    torch.manual_seed(0)
    layers = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
    tensors = [p.detach().clone().to(env.device) for p in layers.parameters()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    what = f"{len(tensors)} tensors, {nbytes / 2**10:.0f} KiB"

    def per_tensor() -> None:
        for t in tensors:
            dist.all_reduce(t)

    def per_tensor_async() -> None:
        for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
            work.wait()

    variants = {
        "all_reduce per tensor": per_tensor,
        "async all_reduce per tensor": per_tensor_async,
        "communicate, 1 buffer": lambda: communicate(tensors, dist.all_reduce),
        f"communicate, {args.bucket_kib} KiB buckets": lambda: communicate(
            tensors, dist.all_reduce, bucket_bytes=args.bucket_kib * 2**10
        ),
    }
    for fn in variants.values():
        fn()
    return rounds_of(variants, args.rounds, args.steps, env), what


def report(
    args: argparse.Namespace,
    env: DistEnv,
    modes: dict,
    comms: dict,
    what: str,
    workload_title: str,
    buckets: int,
) -> None:
    """Rank 0 prints the tables and writes the CSV and the plot."""
    if not env.is_main:
        return
    ddp, base = modes["ddp"], comms["all_reduce per tensor"]
    rows = [("sync step", name, t * 1e3, t / ddp) for name, t in modes.items()]
    rows += [("communication", name, t * 1e3, base / t) for name, t in comms.items()]

    log = rank0_logger(env, "bench")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    log.info("%d ranks, %s, torch %s", env.world_size, env.backend, torch.__version__)
    log.info(
        "load average %s on %d cores (times: fastest round, slowest rank)",
        load,
        os.cpu_count(),
    )
    width = max(len(r[1]) for r in rows)
    for section, title, unit in (
        (
            "sync step",
            f"step time, {workload_title}",
            "vs ddp",
        ),
        ("communication", f"synchronising {what}", "speed-up"),
    ):
        log.info("\n%s\n  %-*s %10s %9s", title, width, "", "ms", unit)
        for _, name, ms, ratio in (r for r in rows if r[0] == section):
            log.info("  %-*s %10.3f %8.2fx", width, name, ms, ratio)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_sync.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["section", "variant", "ms", "ratio", "model", "batch_size", "world_size", "buckets"]
        )
        for section, name, ms, ratio in rows:
            w.writerow(
                [
                    section,
                    name,
                    f"{ms:.4f}",
                    f"{ratio:.4f}",
                    args.model,
                    args.batch_size,
                    env.world_size,
                    buckets if section == "sync step" else "",
                ]
            )
    where = f"{env.world_size} ranks, {env.backend}, {buckets} buckets"
    plot(rows, out / "bench_sync.png", where, what, args)
    log.info("\nwrote %s and %s", out / "bench_sync.csv", out / "bench_sync.png")


def plot(rows: list, path: Path, where: str, what: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, section, title in (
        (left, "sync step", f"step time, --model {args.model} ({where})"),
        (right, "communication", f"all-reduce of {what}"),
    ):
        names = [r[1] for r in rows if r[0] == section]
        ms = [r[2] for r in rows if r[0] == section]
        ratios = [r[3] for r in rows if r[0] == section]
        bars = ax.barh(
            names[::-1], ms[::-1], color="tab:blue" if section == "sync step" else "tab:green"
        )
        suffix = "x ddp" if section == "sync step" else "x faster"
        for bar, ratio in zip(bars, ratios[::-1], strict=True):
            ax.annotate(
                f" {ratio:.2f} {suffix}",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                va="center",
                fontsize=8,
            )
        ax.set_xlabel("ms (fastest round, slowest rank)")
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch_unless_ranked("benchmarks.bench_sync", argv, args)
    with distributed(rank_backend(args.backend)) as env:
        threads = choose_threads(env.local_world_size, device=env.device.type)
        log = rank0_logger(env, "bench")
        log.info(threads)
        log.info("timing the step of every --sync mode (%d rounds x %d steps)", args.rounds,
                 args.steps)  # fmt: skip
        work = workload(args, args.batch_size, env.rank, env.world_size, env.device)
        modes, buckets = bench_sync_modes(args, env, work)
        log.info("overlap launches %d gradient buckets per step (DDP's plan)", buckets)
        log.info("timing 4 ways to synchronise %d small tensors", 2 * args.layers)
        comms, what = bench_communicate(args, env)
        title = f"{work.what}; {buckets} gradient buckets"
        report(args, env, modes, comms, what, title, buckets)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
