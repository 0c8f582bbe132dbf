"""core/dist.py's rendezvous refuses a torchrun restart setup that can hang: --max-restarts
with the workers in the agent's shared store (TORCHELASTIC_USE_AGENT_STORE=True, what torchrun
exports unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1). The whole job: tests/test_launch_elastic.py
(slow)."""

from __future__ import annotations

import pytest
import torch

from core.dist import DistEnv, rendezvous
from core.errors import UsageError

TWO = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, backend="gloo",
              device=torch.device("cpu"))  # fmt: skip


def test_restarts_in_the_agents_store_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # not loopback: env:// as it is
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    wanted = r"^torchrun --max-restarts 3 needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's"
    with pytest.raises(UsageError, match=wanted):
        rendezvous(TWO)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: the shared store is fine
    assert rendezvous(TWO) == {}
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun exports False, rank 0 makes the store
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert rendezvous(TWO) == {}
