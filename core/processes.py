"""Run a command line with a deadline, and kill everything it started once the deadline
passes: the test harness (tests/multiproc.py) and the benchmark drivers that start whole
torchrun jobs (benchmarks/learning_check.py) both need it.

Killing the command's process group is not enough: torchrun starts each worker in a session
of its own, so the workers would survive their launcher and keep the output pipes open.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_with_deadline(
    argv: Sequence[str],
    timeout: float,
    env: Mapping[str, str],
    cwd: Path,
    merge_stderr: bool = False,
) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of `argv`; the status is None when it ran past
    `timeout` and was killed with every process it started. With `merge_stderr`, stderr is
    interleaved into stdout and the third value is empty."""
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, to kill as one
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err or ""
    except subprocess.TimeoutExpired:
        stragglers = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err or ""
