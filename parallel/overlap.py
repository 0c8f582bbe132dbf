"""--sync overlap: DDP's reducer by hand. Bucketed all-reduces launched from gradient hooks
while backward is still computing."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.communicate import (
    CommOp,
    PendingCommunication,
    communicate_async,
    plan_buckets_like_ddp,
)
from parallel.base import GradientSync, drop_unused, gradients, used_anywhere

# DDP's default bucket sizes: 25 MiB buckets, and a 1 MiB first one (the gradients that
# backward produces first), so that the first all-reduce can start early.
BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20


class OverlapSync(GradientSync):
    """Bucketed all-reduce launched from gradient hooks during backward, as DDP does.

    The buckets follow DDP's reducer, because they decide how much communication is left
    when backward ends: DDP's size rule (`plan_buckets_like_ddp`: a bucket closes once it
    reaches its cap, so the last one holds only what remains; on resnet18 9 MB instead of
    the 24 MB a close-before-the-cap rule leaves), and DDP's rebuild: after the first
    synchronising backward the buckets are planned again in the order the gradients actually
    became ready, which rank 0 broadcasts so that every rank launches the same buckets.
    """

    def __init__(
        self,
        model: nn.Module,
        bucket_bytes: int = BUCKET_BYTES,
        first_bucket_bytes: int = FIRST_BUCKET_BYTES,
        all_reduce: CommOp | None = None,
    ) -> None:
        super().__init__(model)
        self.collective = all_reduce  # --topology's hierarchical all-reduce; None: dist's own
        self.bucket_bytes, self.first_bucket_bytes = bucket_bytes, first_bucket_bytes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        # Until a backward has shown the real order, assume backward produces the gradients
        # in reverse order of definition (the last layer's first).
        self._plan(self.params[::-1])
        self._ready_order: list[int] | None = []  # None once the buckets were rebuilt
        self._launched: list[PendingCommunication] = []
        for p in self.params:
            # Runs once p.grad holds this backward's whole gradient (after accumulation,
            # also when p is used several times in forward): DDP's hook point too.
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _plan(self, ordered: list[nn.Parameter]) -> None:
        plan = plan_buckets_like_ddp(ordered, self.bucket_bytes, self.first_bucket_bytes)
        self.buckets = [[ordered[i] for i in bucket] for bucket in plan]
        self._bucket_of = {id(p): k for k, bucket in enumerate(self.buckets) for p in bucket}
        self._ready = [0] * len(self.buckets)

    @property
    def in_flight(self) -> int:
        """Buckets launched in this backward and not yet waited for."""
        return len(self._launched)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.syncing:
            return
        if self._ready_order is not None:
            self._ready_order.append(self._position[id(param)])
        self._ready[self._bucket_of[id(param)]] += 1
        # Launch strictly in bucket order: every rank must issue its collectives in the same
        # order, and gradients may become ready in a different order on different ranks.
        while self.in_flight < len(self.buckets) and self._all_ready(self.in_flight):
            self._launch(self.in_flight)

    def _all_ready(self, index: int) -> bool:
        return self._ready[index] == len(self.buckets[index])

    def _launch(self, index: int) -> None:
        grads = gradients(self.buckets[index])
        self._launched.append(
            communicate_async(grads, self.collective or dist.all_reduce, average=True)
        )

    def _rebuild(self) -> None:
        """Plan the buckets again in rank 0's gradient-ready order (parameters that got no
        gradient go last), as DDP's reducer does once after its first backward."""
        order = list(dict.fromkeys(self._ready_order or []))
        seen = set(order)
        order += [i for i in reversed(range(len(self.params))) if i not in seen]
        agreed = torch.tensor(order, dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(agreed, src=0)
        self._plan([self.params[i] for i in agreed.tolist()])
        self._ready_order = None

    def finish_backward(self) -> None:
        # Which parameters got a gradient here, read before the buckets still waiting (those
        # holding a parameter that got none in this backward) are sent now with zeros for
        # the missing gradients.
        present = [p.grad is not None for p in self.params]
        for index in range(len(self._launched), len(self.buckets)):
            self._launch(index)
        used = used_anywhere(self.params, present)
        for pending in self._launched:
            pending.wait()
        self._launched = []
        drop_unused(self.params, used)  # None again where no rank had a gradient
        if self._ready_order is not None and self.params:
            self._rebuild()
        self._ready = [0] * len(self.buckets)
