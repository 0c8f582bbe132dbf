"""Gradient synchronisation strategies behind `train_ddp.py --sync`.

A strategy owns the model that the training loop calls and decides when gradients (or
parameters) cross the network. The loop only ever does:

    with sync.no_sync():            # micro-steps of gradient accumulation, except the last
        loss(sync.model(x)).backward()
    loss(sync.model(x)).backward()  # the last micro-step
    sync.finish_backward()          # gradients are averaged across ranks when this returns
    optimizer.step()
    sync.after_step(optimizer)

`ddp` is DistributedDataParallel's own reducer, the reference every other mode is tested
against.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from comm.dist import DistEnv, UsageError

SYNC_MODES = ("ddp",)


class Sync:
    """Base strategy: the model is used as it is and nothing is communicated."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def no_sync(self) -> AbstractContextManager:
        raise NotImplementedError

    def finish_backward(self) -> None:
        pass

    def after_step(self, optimizer) -> None:
        pass


class DDPSync(Sync):
    """DistributedDataParallel: broadcasts rank 0's parameters and buffers when it wraps the
    model, then all-reduces gradient buckets from autograd hooks while backward is still
    running, so communication overlaps computation."""

    def __init__(self, model: nn.Module, env: DistEnv) -> None:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        super().__init__(DDP(model, device_ids=device_ids))

    def no_sync(self) -> AbstractContextManager:
        # Forward *and* backward must run inside no_sync(): DDP decides during forward
        # whether the coming backward reduces gradients.
        return self.model.no_sync()


def make_sync(mode: str, model: nn.Module, env: DistEnv, **options) -> Sync:
    if mode == "ddp":
        return DDPSync(model, env)
    raise UsageError(f"unknown --sync {mode!r}; choose one of {', '.join(SYNC_MODES)}")
