"""--sync allreduce: backward runs undisturbed, then one communicate() call averages every
gradient (comm/communicate.py: flatten, all-reduce the flat buffer, write back)."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from comm.communicate import (
    CommOp,
    communicate,
)
from parallel.base import GradientSync, drop_unused, gradients, used_anywhere


class AllReduceSync(GradientSync):
    """Backward runs undisturbed; then one communicate() averages all gradients at once
    (parallel/compressed.py: an approximation of them, --compress)."""

    def __init__(
        self,
        model: nn.Module,
        bucket_bytes: int | None = None,
        all_reduce: CommOp | None = None,
    ) -> None:
        super().__init__(model)
        self.collective = all_reduce  # --topology's hierarchical all-reduce; None: dist's own
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bucket_bytes = bucket_bytes

    def finish_backward(self) -> None:
        used = used_anywhere(self.params)
        communicate(
            gradients(self.params),
            self.collective or dist.all_reduce,  # looked up now: comm/tracer.py patches it
            average=True,
            bucket_bytes=self.bucket_bytes,
        )
        drop_unused(self.params, used)  # None again where no rank had a gradient
