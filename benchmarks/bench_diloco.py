"""Loss against bytes sent: ddp, local SGD, DiLoCo and streaming DiLoCo on the same budget.

    python -m benchmarks.bench_diloco                   # 2 ranks, the default model
    python -m benchmarks.bench_diloco -- --model gpt --dataset stdlib

Every row is a real `torchrun --standalone --nproc-per-node N train_ddp.py --trace-comm` run
on the CPU (gloo, one intra-op thread per rank, one run after the other) with AdamW inside,
the same data, steps and seed; only --sync and its settings differ:

    ddp            the gradients every step
    local-sgd      the replicas (and AdamW's moments) averaged every H steps
    diloco         an outer Nesterov step on the averaged pseudo-gradient every H steps
    diloco-bf16    the same, its all-reduce in bfloat16
    streaming      diloco with the parameters in 2 fragments, synchronised in turn

From each run's summary.json: the eval loss after the run, and the bytes this rank sent in
its training steps (comm/tracer.py, summed over the steps; every step also all-reduces 4
bytes for the preemption check, and log steps the metrics; the start-up broadcast of the
parameters is not counted); from its TensorBoard events, the training loss of every
--log-every steps (the mean over the ranks' batches since the last log line; local SGD's and
DiLoCo's ranks train their own replicas between syncs), set against the bytes sent up to
that step. The table goes to stdout, the rows to <out-dir>/bench_diloco.csv, the curves to
<out-dir>/bench_diloco_curves.csv and loss against bytes (the curves, and each run's eval
loss as a dot at its end) to <out-dir>/bench_diloco.png.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
from pathlib import Path

from benchmarks.bench_compress import traced_run
from core.cli import Parser, positive
from core.errors import UsageError, run_cli

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--nproc", type=positive, default=2, help="ranks of every run")
    p.add_argument("--steps", type=positive, default=240, help="optimizer steps of every run")
    p.add_argument("--every", type=positive, default=8, help="H: steps between syncs")
    p.add_argument("--timeout", type=positive, default=1200, help="seconds per run")
    p.add_argument("--out-dir", default="bench_out", help="where the CSV and the PNG go")
    p.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: more flags for train_ddp.py"
    )
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if any(a.startswith(("--sync", "--outer", "--diloco", "--max-steps")) for a in args.train_args):
        raise UsageError("the benchmark chooses --sync, its settings and --max-steps itself")
    if args.every % 2:
        raise UsageError("--every must be even: the streaming row cuts it in 2 fragments")
    return args


def modes(every: int) -> dict[str, list[str]]:
    h = ["--sync-every", str(every)]
    return {
        "ddp": [],
        "local-sgd": ["--sync", "local-sgd", *h],
        "diloco": ["--sync", "diloco", *h],
        "diloco-bf16": ["--sync", "diloco", *h, "--outer-dtype", "bfloat16"],
        "streaming": ["--sync", "diloco", *h, "--diloco-fragments", "2"],
    }


def train_losses(out_dir: Path) -> dict:
    """The run's training loss at its log steps, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {"train_loss": [(e.step, e.value) for e in events.Scalars("train/loss")]}


def one_run(args: argparse.Namespace, flags: list[str]) -> dict | str:
    """The run's summary.json and training losses, or why there are none."""
    common = ["--optimizer", "adamw", "--lr", "0.001", "--epochs", "1000"]
    steps = ["--max-steps", str(args.steps)]
    return traced_run(
        args.nproc, [*common, *steps, *flags, *args.train_args], args.timeout, train_losses
    )


def curve(result: dict) -> list[tuple[int, float, float]]:
    """(step, MB sent up to and including it, training loss) at each log step."""
    sent = list(itertools.accumulate(result["comm"]["sent_per_rank_per_step"]))
    return [(step, sent[step - 1] / 1e6, loss) for step, loss in result["train_loss"]]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        _, mb, loss = zip(*r["curve"], strict=True)
        (line,) = ax.plot(mb, loss, label=r["mode"], lw=1.2)
        ax.scatter([r["sent_mb"]], [r["eval_loss"]], color=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per rank so far (log)")
    ax.set_ylabel("training loss (line); eval loss after the run (dot)")
    ax.set_title(f"loss against bytes (load average {os.getloadavg()[0]:.1f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    extra = f", then {' '.join(args.train_args)}" if args.train_args else ""
    print(f"{args.nproc} ranks, gloo on CPU, AdamW lr 0.001, {args.steps} steps, H = "
          f"{args.every}{extra}; one run after the other")  # fmt: skip
    print(f"{'mode':14s} {'eval loss':>9s} {'MB sent':>9s} {'vs ddp':>7s}", flush=True)
    rows, failed = [], []
    for name, flags in modes(args.every).items():
        result = one_run(args, flags)
        if isinstance(result, str):
            failed.append(name)
            print(f"{name:14s} failed, {result}", flush=True)
            continue
        sent = sum(result["comm"]["sent_per_rank_per_step"])  # the steps': not start-up
        rows.append(
            {
                "mode": name,
                "eval_loss": result["eval_loss"],
                "sent_mb": sent / 1e6,
                "curve": curve(result),
            }
        )
        ratio = sent / 1e6 / rows[0]["sent_mb"]
        print(f"{name:14s} {result['eval_loss']:9.4f} {sent / 1e6:9.2f} {ratio:7.3f}", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_diloco.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mode", "eval_loss", "sent_mb"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / "bench_diloco_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "step", "sent_mb", "train_loss"])
        w.writerows([r["mode"], *point] for r in rows for point in r["curve"])
    if rows:
        plot(rows, out / "bench_diloco.png")
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
