"""Every process ends cleanly: no native thread of a process group outlives a clean exit, and
after an error the process ends without the interpreter's teardown (see core/dist.py).

The abort these guard against ("terminate called without an active exception", SIGABRT after
the job's last line) is rare and load-dependent, so no single run can show its absence; what
the tests check instead is its cause, deterministically: which threads are alive when the
interpreter starts to shut down. `make stress-exit` runs the scripts many times for the
statistics.

Linux only (/proc/self/task names the threads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import errors
from tests.multiproc import torchrun

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="needs /proc/self/task (Linux)"
)

PROBE = str(Path(__file__).with_name("exit_probe.py"))
# The native threads a process group runs: gloo's work queue and its socket event loop,
# NCCL's watchdog and heartbeat monitor.
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_nccl_watchdg", "pt_nccl_heartbt")


def _check(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("EXIT-CHECK ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0].split(" ", 1)[1])


@pytest.mark.slow  # torchrun once per backend and script: 6 s
def test_no_group_thread_outlives_a_clean_exit(tmp_path):
    # A fresh interpreter under torchrun, as a user's job starts: the test harness's
    # forkserver imports torch._dynamo before any group exists, which would hide the leak
    # this checks for (see core/dist.py). train_ddp's DDP constructor is what imports it.
    flags = ["--epochs", "1", "--max-steps", "3", "--no-eval", "--batch-size", "8"]
    proc = torchrun([PROBE, "train_ddp", *flags, "--out-dir", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = _check(proc.stdout)
    assert check["status"] == 0
    alive = [t for t in check["threads"] if t in GROUP_THREADS]
    assert not alive, f"the group's threads outlived its clean exit: {alive}"
    assert "TEARDOWN" in proc.stdout  # a clean run ends through the normal teardown
    assert "terminate called" not in proc.stderr


def test_an_error_with_the_group_alive_ends_without_teardown():
    # An error leaves the group alive on purpose (peers may be inside a collective), so the
    # process must end through os._exit, with its status and its one error line, never
    # through the interpreter's teardown beside the group's threads. tests/exit_race.py makes
    # that teardown abort deterministically (a gloo thread finishing a collective with a
    # Python callback while rank 0 shuts down); through run_cli it exits 2.
    proc = torchrun([PROBE, "tests.exit_race"], timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 0 stops while its all-reduce is in flight"], proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # the status the error deserved, not a signal
    assert "EXIT-CHECK" not in proc.stdout and "TEARDOWN" not in proc.stdout


GLOO_PEER_GONE = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed "
    "by peer [127.0.0.1]:9961. This is typically caused by a remote worker crashing. Check the "
    "logs of the remote worker before reporting an error."
)


@pytest.mark.parametrize("word", ["closed", "reset"])
def test_a_peer_gone_from_a_collective_is_one_line(capsys, monkeypatch, word):
    """The rank left waiting when its peer is killed (a restart follows) prints one line,
    not the 25-line traceback of the collective; any other error keeps its traceback."""
    monkeypatch.setenv("RANK", "0")
    gone = RuntimeError(GLOO_PEER_GONE.replace("closed", word))
    assert errors._report(gone) == 1
    err = capsys.readouterr().err
    peer = f"Connection {word} by peer [127.0.0.1]:9961"
    assert err == f"error: rank 0: a peer left during a collective ({peer})\n"
    try:
        raise RuntimeError("CUDA error: an illegal memory access")
    except RuntimeError as other:
        assert errors._report(other) == 1
    assert "Traceback" in capsys.readouterr().err
