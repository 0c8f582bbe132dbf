"""Does the default recipe learn for every seed and world size? The real runs, one by one.

    python -m benchmarks.learning_check                      # seeds 0-9 x 1, 2, 4 ranks
    python -m benchmarks.learning_check --seeds 0-2 --worlds 2 --out learning.csv
    python -m benchmarks.learning_check --seeds 0-9 -- --lr 0.05   # another recipe

For each world size W and seed S this runs `torchrun --standalone --nproc-per-node W
train_ddp.py --seed S --epochs E` (a world of one too goes through torchrun), on the CPU with
one thread per process, every other flag at its default: per-rank batch 32, so the global
batch is 32 x W, with the same --lr for every W. The eval accuracy after each epoch comes
from the run's summary.json.

A run passes when its eval accuracy after the first epoch is at least --min-first (0.90)
and no epoch ends more than --max-drop (0.02) below the one before. The default recipe was
chosen to pass with margin; a seed that fails says the recipe is on the edge of diverging
(see the README's note on the learning rate). Exit status 1 if any run fails or times out.

Runs go one after another (a 4-rank world already oversubscribes a 2-core machine), each
under --timeout, past which its whole process tree is killed and it counts as failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from core.cli import Parser, positive
from core.errors import UsageError, run_cli
from core.processes import run_with_deadline

ROOT = Path(__file__).resolve().parent.parent


def int_list(value: str) -> list[int]:
    """'0-9' or '1,2,4' or '0,3-5'."""
    out: list[int] = []
    try:
        for part in value.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 0-9 or 1,2,4, got {value}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty range {value}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--seeds", type=int_list, default=list(range(10)), help="e.g. 0-9 or 0,3")
    p.add_argument("--worlds", type=int_list, default=[1, 2, 4], help="ranks, e.g. 1,2,4")
    p.add_argument("--epochs", type=positive, default=3, help="epochs of each run")
    p.add_argument("--min-first", type=float, default=0.90, help="least eval acc after epoch 0")
    p.add_argument("--max-drop", type=float, default=0.02, help="largest epoch-to-epoch drop")
    p.add_argument("--timeout", type=positive, default=300, help="seconds per run")
    p.add_argument("--out", default=None, help="also write the rows to this CSV file")
    p.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: more flags for train_ddp.py"
    )
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if min(args.worlds) < 1:
        raise UsageError("--worlds: every world size must be 1 or more")
    return args


def run(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, stdout + stderr); status None when it ran past `timeout` and was killed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    code, out, _ = run_with_deadline(argv, timeout, env, ROOT, merge_stderr=True)
    return code, out


def check(accuracy: list[float], epochs: int, min_first: float, max_drop: float) -> str:
    """'ok', or why the run fails the criterion."""
    if len(accuracy) < epochs:
        return f"only {len(accuracy)} of {epochs} epochs"
    if accuracy[0] < min_first:
        return f"epoch 0 below {min_first:.2f}"
    for e in range(1, len(accuracy)):
        # accuracies are multiples of 1/2000: round away float noise before comparing
        if round(accuracy[e - 1] - accuracy[e], 9) > max_drop:
            return f"epoch {e} drops more than {max_drop:.2f}"
    return "ok"


def one_run(args: argparse.Namespace, world: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="learning-check-") as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={world}", "train_ddp.py", "--seed", str(seed),
            "--epochs", str(args.epochs), "--out-dir", out, *args.train_args,
        ]  # fmt: skip
        tic = time.perf_counter()
        status, output = run(cmd, args.timeout)
        seconds = time.perf_counter() - tic
        summary = Path(out) / "summary.json"
        global_batch = None
        if status is None:
            result, history = f"timed out after {args.timeout}s", []
        elif status != 0 or not summary.is_file():
            result, history = f"exit status {status}", []
        else:
            done = json.loads(summary.read_text())
            history, global_batch, result = done["history"], done["global_batch"], ""
    accuracy = [h["eval_accuracy"] for h in history]
    if not result:
        result = check(accuracy, args.epochs, args.min_first, args.max_drop)
    if result != "ok":
        tail = "\n".join(output.strip().splitlines()[-15:])
        print(f"--- world {world} seed {seed}: {result}; its last lines:\n{tail}\n---", flush=True)
    drops = [accuracy[e - 1] - accuracy[e] for e in range(1, len(accuracy))]
    return {
        "world": world,
        "global_batch": global_batch,
        "seed": seed,
        "accuracy": accuracy,
        "max_drop": max([*drops, 0.0]),  # 0: no epoch ended below the one before
        "seconds": seconds,
        "result": result,
    }


def recipe() -> str:
    """The flags that decide whether training learns, as train_ddp.py parses them."""
    import train_ddp

    a = train_ddp.parse_args([])
    return (
        f"--lr {a.lr} --momentum {a.momentum} --lr-schedule {a.lr_schedule} "
        f"--warmup-steps {a.warmup_steps} --batch-size {a.batch_size} (per rank)"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    extra = f", then {' '.join(args.train_args)}" if args.train_args else ""
    print("every run: torchrun with 1 intra-op thread per rank (OMP_NUM_THREADS=1; the runs "
          "go one after the other)")  # fmt: skip
    print(f"recipe: defaults {recipe()}{extra}; synthetic data, {args.epochs} epoch(s)")
    print(f"pass: eval acc after epoch 0 >= {args.min_first:.2f}, no drop > {args.max_drop:.2f}")
    epochs = "".join(f"  epoch{e}" for e in range(args.epochs))
    print(f"world  batch  seed{epochs}  max drop      time  result", flush=True)
    rows, tic = [], time.perf_counter()
    for world in args.worlds:
        for seed in args.seeds:
            r = one_run(args, world, seed)
            rows.append(r)
            accs = "".join(f"  {a:6.4f}" for a in r["accuracy"])
            accs += "       -" * (args.epochs - len(r["accuracy"]))
            print(
                f"{world:5d}  {r['global_batch'] or '-':>5}  {seed:4d}{accs}  {r['max_drop']:8.4f}"
                f"  {r['seconds']:7.1f}s  {r['result']}",
                flush=True,
            )
    print(f"{len(rows)} runs in {time.perf_counter() - tic:.0f}s")
    for world in args.worlds:
        mine = [r for r in rows if r["world"] == world and r["accuracy"]]
        if mine:
            print(
                f"world {world}: worst epoch-0 eval acc "
                f"{min(r['accuracy'][0] for r in mine):.4f}, worst final "
                f"{min(r['accuracy'][-1] for r in mine):.4f}, largest drop "
                f"{max(r['max_drop'] for r in mine):.4f}"
            )
    failed = [r for r in rows if r["result"] != "ok"]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["world", "global_batch", "seed"]
                + [f"eval_acc_epoch{e}" for e in range(args.epochs)]
                + ["max_drop", "seconds", "result"]
            )
            for r in rows:
                accs = [f"{a:.4f}" for a in r["accuracy"]]
                accs += [""] * (args.epochs - len(accs))
                w.writerow(
                    [r["world"], r["global_batch"], r["seed"], *accs]
                    + [f"{r['max_drop']:.4f}", f"{r['seconds']:.1f}", r["result"]]
                )
    print(f"FAIL: {len(failed)} of {len(rows)} runs" if failed else f"PASS: all {len(rows)} runs")
    if failed:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
