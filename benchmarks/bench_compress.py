"""What gradient compression saves and costs: one epoch per mode, accuracy, bytes, time.

    python -m benchmarks.bench_compress                    # 2 ranks, 1 epoch, PowerSGD ranks 1, 4
    python -m benchmarks.bench_compress --ranks 1 --epochs 2 -- --model resnet18

Every row is a real `torchrun --standalone --nproc-per-node N train_ddp.py --trace-comm`
run on the CPU (gloo, one intra-op thread per rank, one run after the other), every other
flag at its default (the default CNN on the synthetic dataset): DDP with each of torch's
comm hooks (`--comm-hook none|fp16|bf16|powersgd`) and `--sync allreduce` with each of the
hand-made compressors (`--compress ...`, error feedback on). From each run's summary.json:

- eval loss and acc: after the run (for --model gpt, per byte: token accuracy);
- bytes/step: the payload of the step's collectives as comm/tracer.py counts them (the most
  common value over the steps: the metric reduction of logging steps and PowerSGD's first
  two plain steps are not typical), and its ratio to the uncompressed gradient bytes;
- step ms: wall time per optimizer step (global batch / samples per second), all of it:
  forward, backward, compression, communication, optimizer;
- comm ms: the tracer's seconds in collectives per step (median). DDP's buckets are timed
  from launch to completion while backward goes on, so they overlap computation.

The table goes to stdout and its rows to <out-dir>/bench_compress.csv. Timings on a shared
machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from core.cli import Parser, positive
from core.errors import UsageError, run_cli
from core.processes import run_with_deadline

ROOT = Path(__file__).resolve().parent.parent


def rank_list(value: str) -> list[int]:
    try:
        ranks = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4, got {value}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"PowerSGD ranks must be 1 or more, got {value}")
    return ranks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--nproc", type=positive, default=2, help="ranks of every run")
    p.add_argument("--epochs", type=positive, default=1, help="epochs of every run")
    p.add_argument("--ranks", type=rank_list, default=[1, 4], help="PowerSGD ranks, e.g. 1,4")
    p.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=None,
        help="only these rows, e.g. ddp,allreduce+powersgd-r1 (default: all)",
    )
    p.add_argument("--timeout", type=positive, default=600, help="seconds per run")
    p.add_argument("--out-dir", default="bench_out", help="where bench_compress.csv goes")
    p.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: more flags for train_ddp.py"
    )
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if any(a.startswith(("--comm-hook", "--compress", "--sync")) for a in args.train_args):
        raise UsageError("the benchmark chooses --sync, --comm-hook and --compress itself")
    unknown = set(args.modes or []) - set(modes(args.ranks))
    if unknown:
        raise UsageError(f"--modes: no row {', '.join(sorted(unknown))} (see --help)")
    return args


def modes(ranks: list[int]) -> dict[str, list[str]]:
    """Row name -> train_ddp.py flags, for every run."""
    rows: dict[str, list[str]] = {"ddp": []}
    for kind in ("fp16", "bf16", *(f"powersgd-r{r}" for r in ranks)):
        hook, _, r = kind.partition("-r")
        rank = ["--powersgd-rank", r] if r else []
        rows[f"ddp+{kind}"] = ["--comm-hook", hook, *rank]
    rows["allreduce"] = ["--sync", "allreduce"]
    for kind in ("fp16", "bf16", *(f"powersgd-r{r}" for r in ranks)):
        made, _, r = kind.partition("-r")
        rank = ["--powersgd-rank", r] if r else []
        rows[f"allreduce+{kind}"] = ["--sync", "allreduce", "--compress", made, *rank]
    return rows


def traced_run(
    nproc: int, flags: list[str], timeout: int, read: Callable[[Path], dict] | None = None
) -> dict | str:
    """`torchrun train_ddp.py --trace-comm FLAGS` on `nproc` CPU ranks (one intra-op thread
    each) into a temporary --out-dir: its summary.json (with what `read` takes from the
    out-dir before it goes), or why there is none."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "train_ddp.py", "--trace-comm", "--out-dir", out,
            *flags,
        ]  # fmt: skip
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        code, output, _ = run_with_deadline(cmd, timeout, env, ROOT, merge_stderr=True)
        summary = Path(out) / "summary.json"
        if code != 0 or not summary.is_file():
            tail = "\n".join(output.strip().splitlines()[-10:])
            return f"exit status {code}:\n{tail}"
        return json.loads(summary.read_text()) | (read(Path(out)) if read else {})


def one_run(args: argparse.Namespace, flags: list[str]) -> dict | str:
    """The run's summary.json, or why there is none."""
    return traced_run(
        args.nproc, ["--epochs", str(args.epochs), *flags, *args.train_args], args.timeout
    )


def row(name: str, s: dict) -> dict:
    comm = s["comm"]
    step_s = s["global_batch"] / s["samples_per_s"]
    per_step = statistics.mode(comm["bytes_per_step"])
    return {
        "mode": name,
        "eval_loss": s["eval_loss"],
        "eval_acc": s["eval_accuracy"],
        "bytes_per_step": per_step,
        "ratio": per_step / comm["model_grad_bytes"],
        "step_ms": 1e3 * step_s,
        "comm_ms": 1e3 * statistics.median(comm["seconds_per_step"]),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    extra = f", then {' '.join(args.train_args)}" if args.train_args else ""
    print(f"{args.nproc} ranks, gloo on CPU, 1 intra-op thread each; train_ddp.py defaults, "
          f"{args.epochs} epoch(s){extra}; one run after the other")  # fmt: skip
    print(f"{'mode':22s} {'eval loss':>9s} {'eval acc':>8s} {'bytes/step':>10s} {'vs fp32':>7s} "
          f"{'step ms':>7s} {'comm ms':>7s}", flush=True)  # fmt: skip
    rows, failed = [], []
    for name, flags in modes(args.ranks).items():
        if args.modes and name not in args.modes:
            continue
        result = one_run(args, flags)
        if isinstance(result, str):
            failed.append(name)
            print(f"{name:22s} failed, {result}", flush=True)
            continue
        r = row(name, result)
        rows.append(r)
        print(
            f"{name:22s} {r['eval_loss']:9.4f} {r['eval_acc']:8.4f} {r['bytes_per_step']:10.0f} "
            f"{r['ratio']:7.3f} {r['step_ms']:7.1f} {r['comm_ms']:7.2f}",
            flush=True,
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_compress.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mode"])
        w.writeheader()
        w.writerows(rows)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
