"""What one lost worker costs: per-step fault tolerance against torchrun's restart path.

    python -m benchmarks.bench_fault_tolerance                 # 3 replicas/ranks, kill at 10
    python -m benchmarks.bench_fault_tolerance --trials 3 --kill-at 7

Both runs train the same model on the CPU (gloo, one thread per process) and lose the last
worker to a SIGKILL right after optimizer step --kill-at (TRAIN_FAULT, training/faults.py):

    fault-tolerant   the coordinator and N replicas (train_ddp.py --fault-tolerance); the
                     survivors go on as a quorum of N-1 (--heartbeat-timeout bounds the
                     detection)
    restart          torchrun --nproc-per-node N --max-restarts 1 train_ddp.py --resume auto
                     --save-every S: every worker is stopped and restarted, and the job
                     resumes from its newest checkpoint

For each: the steps whose work is lost (restart: steps done since the checkpoint it resumes
from; fault-tolerant: steps discarded and redone, 0 when the kill falls between steps), and
the seconds from the kill (the killed process seen gone, polled every 10 ms) to the next
completed step (its log line). The table goes to stdout, the rows to
<out-dir>/bench_fault_tolerance.csv. Timings on a shared machine vary from run to run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from core.cli import Parser, positive, positive_float
from core.errors import UsageError, run_cli
from core.processes import descendants

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
JOB = ["--model", "mlp", "--train-size", "4096", "--batch-size", "8", "--no-eval",
       "--log-every", "1", "--epochs", "100"]  # fmt: skip


class Run:
    """A command whose output lines are timestamped as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        for t, line in list(self.lines):
            if t >= after and (m := re.search(pattern, line)):
                return t, m
        return None

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise UsageError(f"a run took longer than --timeout {timeout:g} s") from None
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def gone(pid: int) -> bool:
    """Exited, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def watch_death(find_victim, deadline: float) -> float:
    """The time the victim process (found by `find_victim()`, polled) is seen gone."""
    pid = None
    while pid is None and time.monotonic() < deadline:
        pid = find_victim()
        time.sleep(0.01)
    while pid is not None and not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic()


def fault_tolerant(args: argparse.Namespace, tmp: Path) -> dict:
    n, k = args.replicas, args.kill_at
    env = {"GLOO_SOCKET_IFNAME": "lo", "TRAIN_FAULT": f"kill:{n - 1}:{k}"}
    coordinator = Run(
        [PYTHON, "-m", "training.quorum", "--min-replicas", str(n - 1), "--expect-replicas",
         str(n), "--heartbeat-timeout", str(args.heartbeat_timeout)], env,
    )  # fmt: skip
    deadline = time.monotonic() + args.timeout
    while not (found := coordinator.first(r"listening on \S+:(\d+)")):
        if time.monotonic() > deadline or coordinator.proc.poll() is not None:
            raise UsageError(f"the coordinator did not start:\n{coordinator.text()}")
        time.sleep(0.05)
    address = f"127.0.0.1:{found[1][1]}"
    flags = [*JOB, "--max-steps", str(args.steps), "--fault-tolerance", "--coordinator", address]
    replicas = [
        Run([PYTHON, "train_ddp.py", *flags, "--replica-id", str(i), "--out-dir", str(tmp)], env)
        for i in range(n)
    ]
    try:
        killed_at = watch_death(lambda: replicas[-1].proc.pid, deadline)
        codes = [r.wait(max(1.0, deadline - time.monotonic())) for r in replicas[:-1]]
    finally:
        for r in [*replicas, coordinator]:
            r.kill()
    survivor = replicas[0]
    if codes != [0] * (n - 1):
        raise UsageError(f"a surviving replica failed:\n{survivor.text()}")
    nxt = survivor.first(rf"step {k + 1} epoch", after=0.0)
    redone = sum(len(re.findall(r"discarded", r.text())) for r in replicas[:-1]) // (n - 1)
    return {"path": "fault-tolerant", "steps_lost": redone, "seconds": nxt[0] - killed_at}


def restart(args: argparse.Namespace, tmp: Path) -> dict:
    n, k = args.replicas, args.kill_at
    env = {
        "GLOO_SOCKET_IFNAME": "lo",
        "TRAIN_FAULT": f"kill:{n - 1}:{k}",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # a fresh store per attempt (core/dist.py)
    }
    run = Run(
        [PYTHON, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
         "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", str(tmp / "rdzv"),
         "--rdzv-conf", "store_type=file", "--local-addr", "127.0.0.1", "train_ddp.py",
         "--backend", "gloo", *JOB, "--max-steps", str(args.steps), "--save-every",
         str(args.save_every), "--resume", "auto", "--out-dir", str(tmp / "out")], env,
    )  # fmt: skip
    deadline = time.monotonic() + args.timeout

    def victim() -> int | None:
        for pid in descendants(run.proc.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={n - 1}".encode() in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
                return pid
        return None

    try:
        killed_at = watch_death(victim, deadline)
        code = run.wait(max(1.0, deadline - time.monotonic()))
    finally:
        run.kill()
    resumed = run.first(r"resumed from .* at step (\d+)")
    if code != 0 or resumed is None:
        raise UsageError(f"the restart run failed or did not resume:\n{run.text()}")
    start = int(resumed[1][1])
    nxt = run.first(rf"step {start + 1}\s", after=resumed[0])
    return {"path": "restart", "steps_lost": k - start, "seconds": nxt[0] - killed_at}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--replicas", type=positive, default=3, help="replicas, or torchrun's ranks")
    p.add_argument("--steps", type=positive, default=30, help="optimizer steps of every run")
    p.add_argument("--kill-at", type=positive, default=10, help="the step after which to kill")
    p.add_argument("--save-every", type=positive, default=4, help="restart path's checkpoints")
    p.add_argument(
        "--heartbeat-timeout", type=positive_float, default=1.0, help="the coordinator's"
    )
    p.add_argument("--trials", type=positive, default=1, help="runs of each path")
    p.add_argument("--timeout", type=positive, default=300, help="seconds per run")
    p.add_argument("--out-dir", default="bench_out", help="where the CSV goes")
    args = p.parse_args(argv)
    if args.replicas < 2:
        raise UsageError("--replicas must be at least 2: one dies, one goes on")
    if not args.kill_at < args.steps:
        raise UsageError(f"--kill-at {args.kill_at} must come before --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for trial in range(args.trials):
        for path in (fault_tolerant, restart):
            with tempfile.TemporaryDirectory() as tmp:
                row = {"trial": trial, **path(args, Path(tmp))}
            rows.append(row)
            print(f"{row['path']:>15}  trial {trial}: {row['steps_lost']} step(s) lost, "
                  f"{row['seconds']:.2f} s from the kill to the next step", flush=True)  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_fault_tolerance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", "path", "steps_lost", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
