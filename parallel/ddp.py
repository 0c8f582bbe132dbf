"""--sync ddp: DistributedDataParallel's own reducer, the reference every other mode is
tested against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel.base import Sync, broadcast_buffers

if TYPE_CHECKING:  # annotations only: the page loads no more of the repository than it uses
    from core.dist import DistEnv


class DDPSync(Sync):
    """DistributedDataParallel: broadcasts rank 0's parameters and buffers when it wraps the
    model, then all-reduces gradient buckets from autograd hooks while backward is still
    running, so communication overlaps computation.

    `model` is a DDP model (train_ddp.py wraps it in plain sight) or a plain module, which
    is wrapped here (benchmarks, tests; `bucket_bytes` sets DDP's bucket cap then).
    parallel/compressed.py adds torch's compression hooks (--comm-hook).

    `find_unused_parameters` (--find-unused-parameters) is DDP's option for models where a
    parameter may get no gradient (a branch skipped by an `if`, a frozen layer): after every
    forward DDP walks the autograd graph from the outputs and marks what it cannot reach as
    ready, and all-reduces a per-parameter "used" map, so that such a parameter keeps
    `grad is None` and is not stepped. Without it DDP stops at the next forward with
    "Expected to have finished reduction in the prior iteration" (pitfalls/unused_parameters.py).
    """

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        bucket_bytes: int | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        if isinstance(model, DDP):
            if bucket_bytes is not None:
                raise ValueError("bucket_bytes: the model is already wrapped, with its own cap")
            if model.find_unused_parameters != find_unused_parameters:
                raise ValueError(
                    "find_unused_parameters: the model is already wrapped without it; "
                    "wrap it with parallel.factory.ddp_kwargs(args)"
                )
        else:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            kwargs = {} if bucket_bytes is None else {"bucket_cap_mb": bucket_bytes / 2**20}
            if find_unused_parameters:
                kwargs["find_unused_parameters"] = True
            model = DDP(model, device_ids=device_ids, **kwargs)
        super().__init__(model)

    def no_sync(self) -> AbstractContextManager:
        # Forward *and* backward must run inside no_sync(): DDP decides during forward
        # whether the coming backward reduces gradients.
        return self.model.no_sync()

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        # Each rank's BatchNorm statistics have moved with its own last batch. DDP replaces
        # them with rank 0's before the next training forward anyway; doing it now makes
        # every rank evaluate the model that the checkpoint holds.
        broadcast_buffers(self.model.module)
        yield
