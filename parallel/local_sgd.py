"""--sync local-sgd: every rank steps alone; every K steps the replicas are averaged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.communicate import (
    CommOp,
    communicate,
)
from core.errors import UsageError
from parallel.base import Sync, broadcast_state


class LocalSGDSync(Sync):
    """Each rank steps alone; every `sync_every` steps the replicas are averaged."""

    def __init__(self, model: nn.Module, sync_every: int, all_reduce: CommOp | None = None) -> None:
        super().__init__(model)
        self.collective = all_reduce  # --topology's hierarchical all-reduce; None: dist's own
        self.sync_every = sync_every
        self.steps = 0  # optimizer steps taken in the run (also before a resume)
        broadcast_state(model)

    def replica_state(
        self, optimizer: torch.optim.Optimizer, stateful: list[bool] | None = None
    ) -> list[torch.Tensor]:
        """What makes up a replica: parameters, floating-point buffers and the optimizer's
        per-parameter tensors (SGD's momentum buffer, Adam's moments). Integer buffers
        (BatchNorm's batch counter) and scalar state (Adam's step) are the same on every rank
        as long as every rank steps every parameter. `stateful`: whose optimizer state to take
        (None: every parameter's that has some here).
        """
        params = list(self.model.parameters())
        tensors = [*params]
        tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        for i, p in enumerate(params):
            if stateful is not None and not stateful[i]:
                continue
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                    tensors.append(value)
        return tensors

    def _average(self, optimizer: torch.optim.Optimizer) -> None:
        # A parameter with no gradient on a rank is not stepped there, and before its first
        # step it has no optimizer state: the ranks may then hold state for different
        # parameters. Only the state every rank holds is averaged (one all-reduce of an int32
        # per parameter tensor, every K steps); the rest stays each rank's own. With a
        # parameter that only some ranks step, local SGD is not the one-process run anyway.
        params = list(self.model.parameters())
        held = [bool(optimizer.state.get(p)) for p in params]
        held = torch.tensor(held, dtype=torch.int32, device=params[0].device)
        dist.all_reduce(held)
        stateful = [h == dist.get_world_size() for h in held.tolist()]
        tensors = self.replica_state(optimizer, stateful)
        communicate(tensors, self.collective or dist.all_reduce, average=True)

    def _replicas_equal(self) -> bool:
        """True when the replicas are equal: no step alone since the last average."""
        return self.steps % self.sync_every == 0

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1
        if self._replicas_equal():
            self._average(optimizer)

    @contextmanager
    def consolidated(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The average of the replicas for the block only: each rank then goes back to its
        own replica, so a run that evaluates or saves between two averages trains exactly
        like one that does not."""
        if self._replicas_equal():
            yield
            return
        replicas = self.replica_state(optimizer)
        own = [t.detach().clone() for t in replicas]
        self._average(optimizer)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, mine in zip(replicas, own, strict=True):
                    t.copy_(mine)

    def rank_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if self._replicas_equal():
            return {}  # the replicas equal the checkpoint's model
        return {"replica": [t.detach().cpu().clone() for t in self.replica_state(optimizer)]}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.steps = step
        replica = (state or {}).get("replica")
        if replica is None:
            return  # saved right after an average (or by another world size): the model
        tensors = self.replica_state(optimizer)
        if not (
            isinstance(replica, list)
            and len(replica) == len(tensors)
            and all(
                torch.is_tensor(r) and r.shape == t.shape and r.dtype == t.dtype
                for r, t in zip(replica, tensors, strict=True)
            )
        ):
            raise UsageError("the checkpoint's local-sgd replica does not fit this model")
        with torch.no_grad():
            for t, saved in zip(tensors, replica, strict=True):
                t.copy_(saved)
