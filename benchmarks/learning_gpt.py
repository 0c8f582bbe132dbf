"""Does the small GPT learn the standard library? One real run, checked against the corpus.

    python -m benchmarks.learning_gpt                  # 2 CPU processes, the `make gpt` recipe
    python -m benchmarks.learning_gpt --nproc 1 --min-gap 1.5 -- --max-steps 1000

It runs `torchrun --standalone --nproc-per-node N train_ddp.py --model gpt --dataset stdlib`
with RECIPE (and whatever follows `--`, which overrides it), one thread per process, and reads
the eval loss in bits per byte from the run's summary.json. The bar is the unigram entropy of
the training bytes, H = -sum p(b) log2 p(b) over the 256 byte values: what a model that knows
only how often each byte occurs would score. The run passes when its eval bits per byte is at
least --min-gap (1.0) below H: it has learned context, not only byte frequencies.

Exit status 1 when the run fails, times out (--timeout, its process tree is killed) or stays
above the bar. Not a test: a few minutes of CPU, more on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.cli import Parser, positive
from core.errors import run_cli
from core.processes import run_with_deadline
from data.text import stdlib_corpus

ROOT = Path(__file__).resolve().parent.parent

# The `make gpt` recipe (Makefile, GPT_FLAGS): the model at its defaults (4 layers, width
# 128, 4 heads, context 128), AdamW with a short warm-up and a cosine decay, 16 windows per
# rank, 600 steps.
RECIPE = [
    "--model", "gpt", "--dataset", "stdlib", "--optimizer", "adamw", "--lr", "3e-3",
    "--warmup-steps", "30", "--lr-schedule", "cosine", "--batch-size", "16",
    "--max-steps", "600", "--eval-size", "256", "--log-every", "25", "--sample", "300",
]  # fmt: skip


def unigram_bits(data: torch.Tensor) -> float:
    """Entropy in bits per byte of the byte frequencies of `data` (uint8)."""
    p = torch.bincount(data.long(), minlength=256).double() / len(data)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = Parser(description=__doc__)
    p.add_argument("--nproc", type=positive, default=2, help="ranks (CPU processes)")
    p.add_argument(
        "--min-gap",
        type=float,
        default=1.0,
        help="bits per byte the eval loss must end below the unigram entropy",
    )
    p.add_argument("--timeout", type=positive, default=1800, help="seconds before the run fails")
    p.add_argument("--out-dir", default=None, help="keep the run here (default: a temp folder)")
    return p.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    train, _ = stdlib_corpus()
    bar = unigram_bits(train)
    print(f"stdlib training split: {len(train):,} bytes, unigram entropy {bar:.3f} bits/byte")
    with tempfile.TemporaryDirectory(prefix="learning-gpt-") as tmp:
        out = Path(args.out_dir or tmp)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(args.nproc), str(ROOT / "train_ddp.py"),
            *RECIPE, *extra, "--out-dir", str(out), "--overwrite",
        ]  # fmt: skip
        print(" ".join(cmd[2:]), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        tic = time.perf_counter()
        code, log, _ = run_with_deadline(cmd, args.timeout, env, ROOT, merge_stderr=True)
        seconds = time.perf_counter() - tic
        print(log, end="")  # its loss falling, and its sample
        if code != 0:
            why = "timed out" if code is None else f"exited with {code}"
            print(f"FAIL: the run {why} after {seconds:.0f} s")
            return 1
        summary = json.loads((out / "summary.json").read_text())
    bits = summary["eval_bits_per_byte"]
    ok = bits <= bar - args.min_gap
    print(
        f"{summary['steps']} steps in {seconds:.0f} s on {args.nproc} process(es): eval "
        f"{bits:.3f} bits/byte (loss {summary['eval_loss']:.3f} nats = "
        f"{summary['eval_loss'] / math.log(2):.3f} bits), unigram entropy {bar:.3f}, gap "
        f"{bar - bits:.3f} (needs >= {args.min_gap}): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
