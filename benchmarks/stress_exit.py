"""Does every process end cleanly? Every torchrun script of the repository, many times over.

    python -m benchmarks.stress_exit                    # 50 runs of each job, 2 at a time
    python -m benchmarks.stress_exit --runs 5 --only no_sync,train_ddp

A job is one script under `torchrun --standalone --nproc-per-node 2`: every pitfall in both
its modes, and a three-step `train_ddp.py` run in each --sync mode. Two jobs run at once by
default (--parallel), so the machine is loaded, which is when an abort at exit used to show
up (issue 19: a gloo thread still running while the interpreter shut down; see
core/dist.py). A run counts as

- an abort when any process of it crashed (torchrun's report shows SIGABRT, SIGSEGV, ...)
  or printed "terminate called" or "Fatal Python error";
- a wrong status when torchrun's exit status is not the job's own (1 for the pitfalls whose
  wrong run ends in the failure it shows, else 0);
- a timeout when it ran past --timeout (then its whole process tree is killed).

Prints one line per finished run that went wrong and a table at the end; exit status 1 if
any run aborted, timed out or ended with a wrong status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import Parser, positive
from core.errors import UsageError, run_cli
from core.processes import run_with_deadline
from parallel.factory import HSDP_MODES, SYNC_MODES
from pitfalls import FAILS_WHEN_WRONG, SCRIPTS

ROOT = Path(__file__).resolve().parent.parent
# A worker that crashed: torchrun's failure report names its signal ("exitcode  : -6 (pid:
# ...)"): SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE. (SIGTERM and SIGKILL are torchrun's own
# doing: it ends the other ranks once one has failed, as the pitfalls' wrong runs do.)
KILLED_BY_SIGNAL = re.compile(r"exitcode\s*:\s*-(6|11|7|4|8)\b")
ABORT_TEXTS = ("terminate called", "Fatal Python error")


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]
    expected_status: int


VERDICTS = ("abort", "status", "timeout")  # what can go wrong with a run


@dataclass
class Tally:
    runs: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    seconds: float = 0.0


def jobs() -> list[Job]:
    out = []
    for script in SCRIPTS:
        for mode in ("wrong", "right"):
            status = 1 if mode == "wrong" and script in FAILS_WHEN_WRONG else 0
            out.append(Job(f"{script} --{mode}", (f"pitfalls/{script}.py", f"--{mode}"), status))
    steps = ("--epochs", "1", "--max-steps", "3", "--no-eval", "--batch-size", "8")
    for mode in SYNC_MODES:
        # hsdp's modes need the nodes they shard inside: 2 of 1 rank, so that the all-reduce
        # across nodes, what they add to zero3 and fsdp2, runs too.
        layout = ("--topology", "2x1") if mode in HSDP_MODES else ()
        argv = ("train_ddp.py", "--sync", mode, *layout, *steps)
        out.append(Job(f"train_ddp --sync {mode}", argv, 0))
    return out


def run_once(job: Job, timeout: float, tmp: Path, index: int) -> tuple[str, float, str]:
    """('ok' | 'abort' | 'status' | 'timeout', seconds, output) of one run of `job`."""
    args = list(job.args)
    if args[0] == "train_ddp.py":
        args += ["--out-dir", str(tmp / f"{job.name.replace(' ', '_')}-{index}")]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    status, out, _ = run_with_deadline(argv, timeout, env, ROOT, merge_stderr=True)
    seconds = time.monotonic() - start
    if status is None:
        return "timeout", seconds, out
    if KILLED_BY_SIGNAL.search(out) or any(text in out for text in ABORT_TEXTS):
        return "abort", seconds, out
    if status != job.expected_status:
        return "status", seconds, out
    return "ok", seconds, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=positive, default=50, help="runs of each job")
    p.add_argument("--parallel", type=positive, default=2, help="runs at the same time")
    p.add_argument("--timeout", type=positive, default=300, help="seconds one run may take")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated substrings: run only the jobs whose name contains one "
        "(e.g. no_sync,train_ddp)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Tally]:
    args = parse_args(argv)
    selected = jobs()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        selected = [j for j in selected if any(w in j.name for w in wanted)]
        if not selected:
            raise UsageError(f"--only {args.only!r} matches no job")
    tallies = {job.name: Tally() for job in selected}
    total = len(selected) * args.runs
    print(f"{len(selected)} jobs x {args.runs} runs, {args.parallel} at a time", flush=True)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="stress-exit-") as tmp,
        ThreadPoolExecutor(args.parallel) as pool,
    ):
        # Round-robin over the jobs, so every job has runs beside every other.
        futures = {
            pool.submit(run_once, job, args.timeout, Path(tmp), i): job
            for i in range(args.runs)
            for job in selected
        }
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            verdict, seconds, out = future.result()
            tally = tallies[job.name]
            tally.runs += 1
            tally.seconds += seconds
            if verdict != "ok":
                tally.bad[verdict] += 1
                print(f"{verdict.upper()}: {job.name}\n{out[-2000:]}", flush=True)
            if done % 25 == 0 or done == total:
                elapsed = time.monotonic() - started
                print(f"[{done}/{total} runs, {elapsed:.0f} s]", flush=True)
    print(f"\n{'job':<34} {'runs':>5} {'aborts':>7} {'status':>7} {'timeouts':>9} {'s/run':>6}")
    for name, t in tallies.items():
        counts = " ".join(f"{t.bad[v]:>{w}}" for v, w in zip(VERDICTS, (7, 7, 9), strict=True))
        print(f"{name:<34} {t.runs:>5} {counts} {t.seconds / t.runs:>6.1f}")
    bad = sum(sum(t.bad.values()) for t in tallies.values())
    print(f"total: {total} runs, {bad} bad")
    if bad:
        raise SystemExit(1)
    return tallies


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
