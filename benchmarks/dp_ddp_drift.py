"""How long do `train_dp.py --batch-size 2B` and 2 ranks x B stay on one trajectory?

    python -m benchmarks.dp_ddp_drift                # 60 steps, float32 and float64 (~2 min)
    python -m benchmarks.dp_ddp_drift --steps 384    # the scripts' default 3 epochs (~6 min)

For each --dtype, the two scripts run as the README shows them, on the CPU with one thread
per process: `python train_dp.py --batch-size 2B` and `torchrun --standalone
--nproc-per-node 2 train_ddp.py --batch-size B`, same seed, default model, data and
learning rate, each saving a checkpoint after every step. The table gives the largest
|parameter difference| between the two after steps 1, 5, 10, 20, 30, ... and the last
step, then each run's eval accuracy at the end.

Why they drift apart: a batch of 2B and the average of two batches of B sum the same
numbers in another order, so their gradients differ by float rounding (~1e-7 relative in
float32, ~1e-16 in float64). Training amplifies such differences step after step (SGD with
momentum on a non-convex loss is chaotic), and once they are large enough to resolve one
max-pool or ReLU decision the other way, the two runs jump apart by far more. Both runs
are correct; only their rounding differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from core.cli import Parser, positive
from core.errors import run_cli
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REPORT_AT = (1, 5, 10, 20, 30, 40, 50, 60, 100, 200, 300, 400)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--steps", type=positive, default=60, help="optimizer steps of each run")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "float64"),
        default=["float32", "float64"],
        help="training dtypes to compare in (each gets its own pair of runs)",
    )
    p.add_argument("--batch-size", type=positive, default=32, help="B: samples per rank")
    p.add_argument("--seed", type=int, default=0, help="the --seed of both runs")
    p.add_argument(
        "--out-dir", default=None, help="keep the runs here (default: a temporary folder)"
    )
    return p.parse_args(argv)


def run(cmd: list[str]) -> None:
    # On the CPU (also where there are GPUs) and one thread per process: the DDP ranks and
    # the single process then each sum in one fixed order, run after run.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def train_pair(args: argparse.Namespace, dtype: str, out: Path) -> None:
    common = [
        "--seed", str(args.seed), "--dtype", dtype, "--max-steps", str(args.steps),
        "--epochs", "1000",  # --max-steps ends the run; eval after each epoch and at the end
        "--save-every", "1", "--keep", str(args.steps), "--log-every", str(args.steps),
    ]  # fmt: skip
    b = args.batch_size
    dp = ["train_dp.py", "--batch-size", str(2 * b), "--out-dir", str(out / "dp")]
    run([sys.executable, *dp, *common])
    ddp = ["train_ddp.py", "--batch-size", str(b), "--out-dir", str(out / "ddp")]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run([sys.executable, *torchrun, *ddp, *common])


def max_difference(a: Path, b: Path) -> float:
    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max((ma[k].double() - mb[k].double()).abs().max().item() for k in ma)


def eval_accuracy(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["eval_accuracy"]


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    args = parse_args(argv)
    steps = sorted({s for s in REPORT_AT if s <= args.steps} | {args.steps})
    name = "checkpoints/step-{:08d}.pt".format
    table: dict[str, dict[int, float]] = {}
    accuracy: dict[str, tuple[float, float]] = {}
    print("both runs: 1 intra-op thread per process (OMP_NUM_THREADS=1), so that each sums in "
          "one fixed order", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dp-ddp-drift-") as tmp:
        root = Path(args.out_dir or tmp)
        for dtype in args.dtype:
            dp, ddp = root / dtype / "dp", root / dtype / "ddp"
            train_pair(args, dtype, root / dtype)
            table[dtype] = {s: max_difference(dp / name(s), ddp / name(s)) for s in steps}
            accuracy[dtype] = (eval_accuracy(dp), eval_accuracy(ddp))
    b = args.batch_size
    print(
        f"max |param difference|: train_dp.py --batch-size {2 * b} vs torchrun "
        f"--nproc-per-node 2 train_ddp.py --batch-size {b} (seed {args.seed}, torch "
        f"{torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()})"
    )
    print("step" + "".join(f"{d:>12}" for d in args.dtype))
    for s in steps:
        print(f"{s:4d}" + "".join(f"{table[d][s]:12.2e}" for d in args.dtype))
    for d in args.dtype:
        print(f"eval accuracy after step {args.steps}, {d}: dp {accuracy[d][0]:.4f}, "
              f"ddp {accuracy[d][1]:.4f}")  # fmt: skip
    print(
        "why: one sum of 2B samples and the average of two sums of B are the same gradient "
        "summed in another float order; SGD with momentum on a non-convex loss amplifies the "
        "rounding differences step by step, and they jump once a max-pool/ReLU decision flips."
    )
    return table


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
