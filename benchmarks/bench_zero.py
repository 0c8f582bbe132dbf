"""From DDP to FSDP: per-rank memory, bytes on the wire and step time of every sharded mode.

    python -m benchmarks.bench_zero --nproc 4      # starts its ranks itself, through torchrun
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m benchmarks.bench_zero

Every mode trains the same model (--model: an image model, or the gpt on text; see
benchmarks/workload.py) with AdamW (2 state tensors per parameter) on a fixed batch:
`ddp`, the hand-made `zero1`, `zero2`, `zero3` (comm/zero*.py) and torch's `torch-zero1`
(ZeroRedundancyOptimizer) and `fsdp2` (fully_shard). For each:

- memory: the bytes of parameters, gradients and optimizer state a rank holds right after
  optimizer.step(), read from the tensors' storages (parallel/memory.py), the largest over the
  ranks, next to the prediction of docs/ddp-to-fsdp.md (flat buffers padded to W x S,
  S = ceil(P/W); zero3 per unit). torch-zero1 and fsdp2 have no exact prediction: they
  partition whole tensors (ZeRO) or pad each tensor (FSDP2);
- traffic: the bytes one rank sends in one step, from comm/tracer.py (the ring model:
  (W-1)/W x payload per all-gather and reduce-scatter, 2(W-1)/W per all-reduce), next to
  the formula;
- peak: the most bytes of tensors a rank held at once during one step (activations and
  gathered parameters included), as torch's MemTracker counts them (`peak_bytes`);
- step time: forward, backward, synchronisation, AdamW step; fastest of --rounds rounds,
  slowest rank (as benchmarks/bench_sync.py), and its ratio to ddp's.

With --param-dtype/--reduce-dtype (mixed precision: float32 masters, 16-bit compute copies
and collectives) the hand-made modes and fsdp2 run with them, ddp and torch-zero1 in float32;
the predictions follow parallel/memory.py's predicted_bytes.

The table goes to stdout, the rows to <out-dir>/bench_zero.csv and a plot to
<out-dir>/bench_zero.png. Timings on a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._tools.mem_tracker import MemTracker

from benchmarks.bench_sync import rounds_of
from benchmarks.workload import Workload, add_model_flags, workload
from comm.tracer import CommTracer
from core.cli import Parser, positive
from core.dist import DistEnv, distributed, rank0_logger
from core.errors import UsageError, run_cli
from parallel.factory import make_sync, precision_from_args
from parallel.flags import MIXED_PRECISION_MODES, PARAM_DTYPES, REDUCE_DTYPES
from parallel.memory import predicted_bytes, rank_memory
from parallel.zero1 import FULL
from study.bench import add_world_flags, launch_unless_ranked, rank_backend

MODES = ("ddp", "zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
KINDS = ("params", "grads", "optimizer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="the --sync modes to run (ddp among them: the times are ratios to it)",
    )
    p.add_argument("--batch-size", type=positive, default=32, help="samples per rank per step")
    p.add_argument("--steps", type=positive, default=5, help="timed steps per mode per round")
    p.add_argument("--rounds", type=positive, default=5, help="rounds; the fastest is reported")
    p.add_argument("--warmup", type=positive, default=2, help="untimed steps per mode first")
    p.add_argument(
        "--param-dtype", default=None, choices=PARAM_DTYPES, help="compute copies' dtype"
    )
    p.add_argument(
        "--reduce-dtype", default=None, choices=REDUCE_DTYPES, help="gradients' dtype on the wire"
    )
    add_world_flags(p)
    p.add_argument("--out-dir", default="bench_out", help="where the CSV and the PNG go")
    args = p.parse_args(argv)
    if "ddp" not in args.modes:
        raise UsageError("--modes must include ddp: every time is reported as a ratio to it")
    args.modes = list(dict.fromkeys(args.modes))  # each once, in the order given
    return args


def units(model: nn.Module) -> list[int]:
    """Elements of each module that owns parameters: parallel/zero3.py's units."""
    return [
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def predicted(
    mode: str,
    sizes: list[int],
    w: int,
    element: int,
    param: int | None,
    reduce: int | None,
    tensors: int,
) -> dict[str, float | None]:
    """Bytes per rank (the largest rank, rank 0) and bytes sent per step, from the formulas
    (parallel/memory.py), in units of `element` bytes; the hand-made modes add their used map,
    an int32 per parameter tensor (parallel/base.py)."""
    if mode not in ("ddp", "zero1", "zero2", "zero3"):
        return dict(params=None, grads=None, optimizer=None, sent=None, element=element)
    if mode == "ddp":
        param = reduce = None  # ddp runs in float32
    tensors = 0 if mode == "ddp" else tensors
    got = predicted_bytes(
        mode, sizes, w, 0, master=element, param=param, reduce=reduce, tensors=tensors
    )
    return {k: v / element for k, v in got.items()} | {"element": element}


def peak_bytes(step, model: nn.Module, optimizer) -> int:
    """The most bytes of tensors alive at once during `step()`, as torch's MemTracker counts
    them: the model's parameters and gradients, the optimizer's state and every tensor
    allocated by an operator in the step (activations, gathered parameters, communication
    buffers allocated through torch). Buffers allocated inside C++ before the step and
    never handed to Python, such as DDP's reducer buckets, are not seen."""
    tracker = MemTracker()
    tracker.track_external(model, getattr(optimizer, "optim", optimizer))
    with tracker:
        step()
    return int(sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values()))


def measure(args: argparse.Namespace, env: DistEnv, work: Workload) -> list[dict]:
    rows, steps = [], {}
    for mode in args.modes:
        torch.manual_seed(0)
        model = work.build().to(env.device)
        sizes = units(model)
        precision = precision_from_args(args) if mode in MIXED_PRECISION_MODES else FULL
        sync = make_sync(mode, model, env, precision=precision)
        optimizer = sync.make_optimizer(torch.optim.AdamW, dict(lr=1e-3))
        held: dict[str, int] = {}

        def step(sync=sync, optimizer=optimizer, held=held) -> None:
            work.loss(sync.model).backward()
            sync.finish_backward()
            optimizer.step()
            held.update(rank_memory(sync.model, optimizer))
            sync.after_step(optimizer)
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        tracer = CommTracer(enabled=True)
        tracer.attach(sync.model)  # DDP's buckets; the other collectives once started
        first = len(tracer.events)
        with tracer:
            step()
        sent = sum(e.sent for e in tracer.events[first:])
        held["peak"] = peak_bytes(step, sync.model, optimizer)
        largest = [None] * env.world_size
        dist.all_gather_object(largest, held)
        row = {k: max(r[k] for r in largest) for k in (*KINDS, "peak")}
        param = precision.param_dtype.itemsize if precision.param_dtype else None
        reduce = precision.reduce_dtype.itemsize if precision.reduce_dtype else None
        tensors = sum(1 for _ in model.parameters())
        guess = predicted(mode, sizes, env.world_size, 4, param, reduce, tensors)
        row.update(mode=mode, sent=sent, predicted=guess)

        rows.append(row)
        steps[mode] = step
    times = rounds_of(steps, args.rounds, args.steps, env)
    for row in rows:
        row["ms"] = times[row["mode"]] * 1e3
        row["vs_ddp"] = times[row["mode"]] / times["ddp"]
    return rows


def report(args: argparse.Namespace, env: DistEnv, work: Workload, rows: list[dict]) -> None:
    if not env.is_main:
        return
    log = rank0_logger(env, "bench")
    p = sum(units(work.build()))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    log.info(
        "%d ranks, %s, torch %s, %s (P = %d parameters, float32; --param-dtype %s "
        "--reduce-dtype %s), AdamW",
        env.world_size,
        env.backend,
        torch.__version__,
        work.what,
        p,
        args.param_dtype,
        args.reduce_dtype,
    )
    log.info(
        "load average %s on %d cores (times: fastest round, slowest rank)", load, os.cpu_count()
    )
    log.info(
        "\nper rank (largest rank), bytes per parameter: measured (predicted)\n"
        "  %-12s %14s %14s %14s %14s %18s %9s %9s %7s",
        "mode",
        "params",
        "grads",
        "optimizer",
        "total",
        "sent/step (/P)",
        "peak MB",
        "ms",
        "vs ddp",
    )

    def cell(measured: float, pred: float | None) -> str:
        return f"{measured:.2f} ({pred:.2f})" if pred is not None else f"{measured:.2f} (-)"

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_zero.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["mode", *KINDS, *(f"predicted_{k}" for k in KINDS), "sent", "predicted_sent"]
            + ["ms", "vs_ddp", "parameters", "world_size", "peak"]
        )
        for row in rows:
            pred = row["predicted"]
            e = pred["element"]
            per = {k: row[k] / p for k in KINDS}
            guess = {k: (pred[k] * e / p if pred[k] is not None else None) for k in KINDS}
            total_pred = None if guess["params"] is None else sum(guess.values())
            sent_pred = pred["sent"] * e / p if pred["sent"] is not None else None
            log.info(
                "  %-12s %14s %14s %14s %14s %18s %9.2f %9.2f %6.2fx",
                row["mode"],
                *(cell(per[k], guess[k]) for k in KINDS),
                cell(sum(per.values()), total_pred),
                cell(row["sent"] / p, sent_pred),
                row["peak"] / 1e6,
                row["ms"],
                row["vs_ddp"],
            )
            w.writerow(
                [row["mode"], *(row[k] for k in KINDS)]
                + [pred[k] * e if pred[k] is not None else "" for k in KINDS]
                + [f"{row['sent']:.1f}", f"{pred['sent'] * e:.1f}" if pred["sent"] else ""]
                + [f"{row['ms']:.3f}", f"{row['vs_ddp']:.3f}", p, env.world_size, row["peak"]]
            )
    plot(rows, p, out / "bench_zero.png", env)
    log.info("\nwrote %s and %s", out / "bench_zero.csv", out / "bench_zero.png")


def plot(rows: list[dict], p: int, path: Path, env: DistEnv) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, net, time) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["mode"] for r in rows]
    bottom = [0.0] * len(rows)
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        values = [r[kind] / p for r in rows]
        mem.bar(names, values, bottom=bottom, color=color, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, r in enumerate(rows):
        pred = r["predicted"]
        if pred["params"] is not None:
            total = sum(pred[k] for k in KINDS) * pred["element"] / p
            mem.plot([i - 0.4, i + 0.4], [total, total], color="black", lw=1)
    mem.set_ylabel("bytes per parameter, largest rank (line: predicted)")
    mem.legend(fontsize=8)
    net.bar(names, [r["sent"] / p for r in rows], color="tab:purple")
    for i, r in enumerate(rows):
        if r["predicted"]["sent"] is not None:
            y = r["predicted"]["sent"] * r["predicted"]["element"] / p
            net.plot([i - 0.4, i + 0.4], [y, y], color="black", lw=1)
    net.set_ylabel("bytes sent per rank per step / P (line: formula)")
    time.bar(names, [r["ms"] for r in rows], color="tab:gray")
    time.set_ylabel("ms per step (fastest round, slowest rank)")
    for ax in (mem, net, time):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(f"From DDP to FSDP: AdamW, {env.world_size} ranks, {env.backend}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch_unless_ranked("benchmarks.bench_zero", argv, args)
    with distributed(rank_backend(args.backend)) as env:
        work = workload(args, args.batch_size, env.rank, env.world_size, env.device)
        report(args, env, work, measure(args, env, work))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
