"""DataParallel vs DistributedDataParallel: training samples/s for the same model and the
same global batch, on whatever this machine has.

    python -m benchmarks.bench_dp_ddp                        # CPU: 2 workers, bench_out/
    python -m benchmarks.bench_dp_ddp --nproc 4 --steps 50   # GPUs: --nproc defaults to all

Every run starts with `plain` on one device and one thread: the speed-up column is against
it. On CPU it then compares one process with N processes:
  plain       what train_dp.py runs without a GPU: one process, N intra-op threads
  scratch-dp  DataParallel's mechanism (parallel/dataparallel.py) over N CPU "devices": one
              process, a replica per Python thread, one intra-op thread each
  ddp         N gloo processes with one thread each, batch / N per rank
On GPUs: nn.DataParallel (and the scratch version) over N GPUs against one DDP process per
GPU (nccl); with one GPU DataParallel is the plain module: only plain and 1-rank ddp run.

Each configuration runs --warmup steps, then times --steps full training steps (forward,
backward, gradient synchronisation, SGD step) on one fixed batch, so data loading is not
measured; of --repeats such windows the fastest counts. The table goes to stdout, the
rows to <out-dir>/dp_vs_ddp.csv, a bar chart to <out-dir>/dp_vs_ddp.png. Compare rows of
one run only: timings from a loaded machine differ from run to run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from core.cli import Parser, positive
from core.dist import choose_threads
from core.errors import UsageError, run_cli
from parallel.dataparallel import ScratchDataParallel
from training.models import MODELS, build_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--model", default="cnn", choices=MODELS, help="network to train")
    p.add_argument(
        "--global-batch",
        type=positive,
        default=64,
        help="samples per step, rounded up to a multiple of --nproc (DDP splits it evenly)",
    )
    p.add_argument("--steps", type=positive, default=20, help="timed training steps")
    p.add_argument("--warmup", type=positive, default=3, help="untimed steps before timing")
    p.add_argument(
        "--repeats",
        type=positive,
        default=3,
        help="time --steps this many times and keep the fastest (the least disturbed)",
    )
    p.add_argument(
        "--nproc",
        type=positive,
        default=None,
        help="DDP processes / DP devices (default: every GPU, or 2 on CPU)",
    )
    p.add_argument("--out-dir", default="bench_out", help="where the CSV and the PNG go")
    return p.parse_args(argv)


def batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch in every process (a fixed seed): 32x32 RGB, 10 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.global_batch, 3, 32, 32, generator=g)
    y = torch.randint(10, (args.global_batch,), generator=g)
    return x.to(device), y.to(device)


def model_on(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(args.model, 3, 32, 10).to(device)


def timed_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> float:
    """Seconds for --steps training steps after --warmup untimed ones: the fastest of
    --repeats windows, since other load on the machine only ever adds time."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    best = float("inf")
    for _ in range(args.repeats):
        sync(x.device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(x.device)
        best = min(best, time.perf_counter() - tic)
    return best


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (CUDA is asynchronous) and for the other ranks."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def one_process(args, mode: str, devices: list[torch.device], threads: int) -> float:
    torch.set_num_threads(threads)
    model = model_on(args, devices[0])
    if mode == "dataparallel":
        model = nn.DataParallel(model, device_ids=devices)
    elif mode == "scratch-dp":
        model = ScratchDataParallel(model, devices)
    return timed_steps(model, *batch(args, devices[0]), args)


def _ddp_rank(rank: int, args, nproc: int, cuda: bool, store: str, result: str) -> None:
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.FileStore(store, nproc),
        rank=rank,
        world_size=nproc,
        timeout=timedelta(seconds=120),
    )
    try:
        model = nn.parallel.DistributedDataParallel(
            model_on(args, device), device_ids=[rank] if cuda else None
        )
        x, y = batch(args, device)
        seconds = timed_steps(model, x[rank::nproc], y[rank::nproc], args)
        if rank == 0:
            Path(result).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def ddp(args, nproc: int, cuda: bool) -> float:
    """One process per rank (spawned; a FileStore rendezvous, so no port is needed)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = os.path.join(tmp, "seconds.json")
        mp.spawn(
            _ddp_rank, args=(args, nproc, cuda, os.path.join(tmp, "store"), result), nprocs=nproc
        )
        return json.loads(Path(result).read_text())


def split_evenly(global_batch: int, nproc: int) -> int:
    """`global_batch` rounded up to a multiple of `nproc`: every DDP rank gets the same share,
    and every configuration trains on the same global batch (64 on 3 GPUs: 66)."""
    return -(-global_batch // nproc) * nproc


def machine(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {load:.1f}"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    if cuda and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible")
    where = machine(cuda)
    if args.global_batch % nproc:
        fitted = split_evenly(args.global_batch, nproc)
        print(f"--global-batch {args.global_batch} does not split over {nproc}: using {fitted}")
        args.global_batch = fitted
    print(f"{args.model}, global batch {args.global_batch}, {args.steps} steps; {where}")

    # (label, processes, threads per process, how to time it)
    if cuda:
        gpus = [torch.device("cuda", i) for i in range(nproc)]
        configs = [("plain", 1, 1, lambda: one_process(args, "plain", gpus[:1], 1))]
        if nproc > 1:
            configs += [
                ("dataparallel", 1, 1, lambda: one_process(args, "dataparallel", gpus, 1)),
                ("scratch-dp", 1, 1, lambda: one_process(args, "scratch-dp", gpus, 1)),
            ]
        configs += [("ddp (nccl)", nproc, 1, lambda: ddp(args, nproc, cuda=True))]
    else:
        cpus = [torch.device("cpu")] * nproc
        configs = [
            ("plain", 1, 1, lambda: one_process(args, "plain", cpus[:1], 1)),
            ("plain", 1, nproc, lambda: one_process(args, "plain", cpus[:1], nproc)),
            ("scratch-dp", 1, 1, lambda: one_process(args, "scratch-dp", cpus, 1)),
            ("ddp (gloo)", nproc, 1, lambda: ddp(args, nproc, cuda=False)),
        ]

    rows = []
    for i, (label, processes, threads, run) in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] timing {label}: {processes} process(es) x {threads} thread(s)",
              flush=True)  # fmt: skip
        seconds = run()
        rows.append(
            {
                "mode": label,
                "processes": processes,
                "threads_per_process": threads,
                "devices": nproc,
                "global_batch": args.global_batch,
                "steps": args.steps,
                "seconds": round(seconds, 4),
                "samples_per_s": round(args.global_batch * args.steps / seconds, 1),
            }
        )
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = round(row["samples_per_s"] / base, 2)

    print(f"{'mode':<14}{'processes':>10}{'threads':>9}{'samples/s':>12}{'speed-up':>10}")
    for r in rows:
        print(
            f"{r['mode']:<14}{r['processes']:>10}{r['threads_per_process']:>9}"
            f"{r['samples_per_s']:>12.1f}{r['speedup']:>10.2f}"
        )
    if not cuda:
        # What the rows mean for the training script: it picks its own threads.
        before = torch.get_num_threads()
        picked = choose_threads(1)
        torch.set_num_threads(before)  # choose_threads set them for this process; undo
        print(f"train_dp.py on this machine runs the plain model with {picked}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dp_vs_ddp.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, f"{args.model}, global batch {args.global_batch}\n{where}", out / "dp_vs_ddp.png")
    print(f"wrote {out / 'dp_vs_ddp.csv'} and {out / 'dp_vs_ddp.png'}")
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['mode']}\n{r['processes']} proc x {r['threads_per_process']} thr" for r in rows]
    bars = ax.bar(labels, [r["samples_per_s"] for r in rows], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("training samples / s")
    ax.margins(y=0.15)  # room for the labels above the bars
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
