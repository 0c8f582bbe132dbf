"""Run a command line with a deadline, and kill everything it started once the deadline
passes: the test harness (tests/multiproc.py) and the benchmark drivers that start whole
torchrun jobs (benchmarks/learning_check.py) both need it.

Killing the command's process group is not enough: torchrun starts each worker in a session
of its own, so the workers would survive their launcher and keep the output pipes open.
`die_with_parent` is the other half: a process that calls it ends when its parent does, even
when the parent is SIGKILLed (by the kernel's OOM killer, say), which no cleanup code of the
parent's can handle.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing happens), also when the parent exits during the call.
    Also usable as Popen's preexec_fn, for the child."""
    if not os.path.exists("/proc/self"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: nothing to do
        return
    if os.getppid() != parent:  # it exited between the two calls
        os.kill(os.getpid(), sig)


def available_memory() -> int | None:
    """Bytes this node can still give to new processes (MemAvailable: free memory and the
    caches the kernel would drop), or None where /proc does not say. What a program checks
    a size against before it allocates: past it, the kernel's OOM killer ends the process
    without a line."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
