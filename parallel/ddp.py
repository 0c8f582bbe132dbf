"""--sync ddp: DistributedDataParallel's own reducer, the reference every other mode is
tested against.

Resuming it exactly, at any world size
--------------------------------------
DDP all-reduces flat buckets of gradients. Its first synchronising backward reduces the
layout it was built with (parameters in definition order); during that backward it notes
the order in which the gradients become ready, and at the next forward it rebuilds the
buckets in that order, once for the whole run. At 3 or more gloo ranks the sum of an
element depends on its offset in the buffer (which rank's chunk of the ring it falls in),
so a process that resumes at step k would reduce step k + 1 in the first layout where the
uninterrupted run reduced it in the rebuilt one: the same run to float rounding, not bit for
bit (at 2 ranks the sum of two numbers has no order, and nothing shows).

So `DDPSync` records the ready order of the first synchronising backward, the checkpoint
keeps it (`rank_state`), and a resumed process makes DDP rebuild to it before its first step
(`load_rank_state`): one backward of a zero graph through DDP whose gradients become ready
in the recorded order (an all-reduce of zeros; the gradients it leaves are dropped). With
`find_unused_parameters=True` DDP never rebuilds its buckets, and nothing is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel.base import Sync, broadcast_buffers

if TYPE_CHECKING:  # annotations only: the page loads no more of the repository than it uses
    from core.dist import DistEnv

READY_ORDER = "ddp_ready_order"  # the rank state's key


class DDPSync(Sync):
    """DistributedDataParallel: broadcasts rank 0's parameters and buffers when it wraps the
    model, then all-reduces gradient buckets from autograd hooks while backward is still
    running, so communication overlaps computation.

    `model` is a DDP model (train_ddp.py wraps it in plain sight) or a plain module, which
    is wrapped here (benchmarks, tests; `bucket_bytes` sets DDP's bucket cap then).
    parallel/compressed.py adds torch's compression hooks (--comm-hook)."""

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        bucket_bytes: int | None = None,
    ) -> None:
        if isinstance(model, DDP):
            if bucket_bytes is not None:
                raise ValueError("bucket_bytes: the model is already wrapped, with its own cap")
        else:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            kwargs = {} if bucket_bytes is None else {"bucket_cap_mb": bucket_bytes / 2**20}
            model = DDP(model, device_ids=device_ids, **kwargs)
        super().__init__(model)
        self.layout = BucketLayout(model)

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

    def rank_state(self, optimizer) -> dict:
        order = self.layout.ready_order
        return {READY_ORDER: order} if order is not None else {}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        order = (state or {}).get(READY_ORDER)
        if order is not None:  # None: a checkpoint written before any synchronising step
            self.layout.rebuild(order)


class BucketLayout:
    """The order in which backward makes DDP's gradients ready, as DDP's bucket rebuild
    sees it: recorded once, at the first synchronising backward, and replayed on resume."""

    def __init__(self, model: DDP) -> None:
        self.model = model
        # DDP's own list: the parameters that require a gradient, shared ones once.
        self.params = [
            p
            for name, p in model.module.named_parameters()
            if p.requires_grad and name not in model.parameters_to_ignore
        ]
        # DDP rebuilds its buckets unless it looks for unused parameters on a dynamic graph.
        self.rebuilds = model.static_graph or not model.find_unused_parameters
        self.ready_order: list[int] | None = None
        self._seen: list[int] = []
        self._hooks = []
        if self.rebuilds:
            self._hooks = [
                p.register_post_accumulate_grad_hook(functools.partial(self._ready, i))
                for i, p in enumerate(self.params)
            ]

    def _ready(self, index: int, param: torch.Tensor) -> None:
        if not self.model.require_backward_grad_sync:
            return  # a no_sync() micro-step: DDP rebuilds from the first synchronising one
        if not self._seen:  # the first gradient of this backward: settle at its end
            torch.autograd.Variable._execution_engine.queue_callback(self._settle)
        self._seen.append(index)

    def _settle(self) -> None:
        # After the backward: hooks may not be removed while autograd runs them.
        if len(self._seen) == len(self.params):
            self.ready_order = list(self._seen)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._seen = [], []

    def rebuild(self, order: object) -> None:
        """Make DDP rebuild its buckets in `order` (a checkpoint's ready order: untrusted,
        ValueError if it does not fit) before the first step, as the run that wrote the
        checkpoint did after its first."""
        n = len(self.params)
        if not (
            isinstance(order, list)
            and all(type(i) is int for i in order)
            and sorted(order) == list(range(n))
        ):
            raise ValueError(
                f"its DDP gradient order is not an order of this model's {n} parameters"
            )
        if not self.rebuilds:
            return
        model = self.model
        # What DDP.forward does around the module, with a zero graph in place of the module:
        # its backward makes the parameters' gradients ready last-created first (autograd
        # runs the node created last among those ready, and accumulates a gradient as soon
        # as it is computed), so the first of `order` is built last. Any input will do.
        model._pre_forward(torch.zeros((), device=self.params[0].device))
        with torch.enable_grad():
            out = None
            for i in reversed(order):
                term = self.params[i].sum() * 0
                out = term if out is None else out + term
        model._post_forward(out).backward()
        for p in self.params:
            p.grad = None  # zeros, all-reduced: the first step starts from none, as it would
