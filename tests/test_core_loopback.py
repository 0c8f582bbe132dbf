"""The CPU simulation listens on loopback only: the workers' store that rank 0 opens
(core/dist.py: loopback_store), and everything launch/cpu_sim.sh starts. The oracle is the
kernel's own table of listening sockets (/proc/net/tcp), read for the job's process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from core.dist import DistEnv, rendezvous
from tests.listeners import is_loopback, listening
from tests.multiproc import ROOT
from tests.test_launch_scripts import UNSET, free_port

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux /proc")
ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
              device=torch.device("cpu"))  # fmt: skip


def test_the_workers_store_listens_on_loopback_only(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store = rendezvous(ONE, timedelta(seconds=30))["store"]
    store.set("key", "value")
    assert store.get("key") == b"value"
    ours = {addr for addr, p in listening(os.getpid()) if p == port}
    assert ours == {"127.0.0.1"}, ours
    # What it replaces: torch's TCPStore given the same loopback address listens on every
    # interface (the wildcard address), which is what the simulation must not do.
    other = free_port()
    plain = dist.TCPStore("127.0.0.1", other, 1, True, timedelta(seconds=30))
    plain.set("key", "value")
    wild = {addr for addr, p in listening(os.getpid()) if p == other}
    assert wild and not any(is_loopback(a) for a in wild), wild
    # Under torchrun's shared agent store the agent serves it: nothing to make here.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert rendezvous(ONE) == {}


@pytest.mark.slow
def test_cpu_sim_listens_on_loopback_only(tmp_path):
    # The whole job, sampled every 0.1 s while it trains: the agent, both ranks, gloo.
    argv = ["bash", str(ROOT / "launch" / "cpu_sim.sh"), "2", "--train-size", "512"]
    argv += ["--no-eval", "--epochs", "1", "--out-dir", str(tmp_path / "o")]
    env = {**os.environ, **UNSET, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    seen: set[tuple[str, int]] = set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listening(proc.pid)
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode()
    assert proc.returncode == 0, out
    assert "done: 8 steps" in out, out
    assert seen, "no listening socket seen: the sampler missed the job"
    exposed = {(a, p) for a, p in seen if not is_loopback(a)}
    assert not exposed, f"listening beyond loopback: {exposed}"
