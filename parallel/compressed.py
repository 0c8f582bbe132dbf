"""Compressed gradient sync: fewer bytes on the wire for an approximate average.

- `--sync ddp --comm-hook fp16|bf16|powersgd`: torch's DDP communication hooks, registered on
  the DDP model (`CompressedDDPSync`).
- `--sync allreduce --compress fp16|bf16|powersgd`: the hand-made twins of those hooks
  (`CompressedAllReduceSync`), the codecs of comm/compress.py.

Neither can be resumed: error-feedback residuals and PowerSGD's Q are not in the checkpoint,
so a resume is refused in one line (`Compression.refuse_resume`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from comm.compress import Compression, make_compressor, register_comm_hook
from parallel.base import GradientSync, drop_unused, gradients, used_anywhere
from parallel.ddp import DDPSync, ReadyOrder

if TYPE_CHECKING:  # annotations only
    from core.dist import DistEnv


class CompressedDDPSync(DDPSync):
    """DDP with one of torch's compression hooks in place of its plain bucket all-reduce."""

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        compression: Compression,
        bucket_bytes: int | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        super().__init__(model, env, bucket_bytes, find_unused_parameters)
        self.compression = compression
        self.hook_state = register_comm_hook(self.model, compression)

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.compression.refuse_resume(step)


class CompressedAllReduceSync(GradientSync):
    """After backward, a compressor averages an approximation of every gradient."""

    def __init__(self, model: nn.Module, compression: Compression) -> None:
        super().__init__(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.compression = compression
        self.compressor = make_compressor(compression)
        # The order DDP's bucket rebuild would see: the twin reduces the hook's buckets.
        self.ready = ReadyOrder(self.params, lambda: self.syncing)

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.compression.refuse_resume(step)

    def finish_backward(self) -> None:
        used = used_anywhere(self.params)
        self.compressor.all_reduce_mean(gradients(self.params), self.ready.order)
        drop_unused(self.params, used)  # None again where no rank had a gradient
