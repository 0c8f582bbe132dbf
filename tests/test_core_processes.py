"""core/processes.py's die_with_parent: a process that calls it does not outlive its parent,
even when the parent is SIGKILLed and can run no cleanup of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.multiproc import ROOT

CHILD = (
    "from core.processes import die_with_parent as d; {call}; import time; "
    "print(flush=True); time.sleep(60)"
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("call", ["d()", "pass"])
def test_a_child_that_asks_dies_with_its_killed_parent(call):
    """The parent, a shell, starts the child and is SIGKILLed; the child is gone within a
    second if it called die_with_parent, and still there (the oracle that the test can
    fail) if it did not."""
    script = f"{sys.executable} -c '{CHILD.format(call=call)}' & echo $!; wait"
    shell = subprocess.Popen(["sh", "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(shell.stdout.readline())
    try:
        shell.stdout.readline()  # the child has made its call
        assert _alive(child)
        shell.kill()
        shell.wait()
        # gone within 5 s when it asked; the control, which did not, is watched for 1 s
        deadline = time.monotonic() + (1 if call == "pass" else 5)
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) == (call == "pass")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
