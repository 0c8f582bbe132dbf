"""ZeRO stage 2 by hand: optimizer state *and* gradients sharded.

    train_ddp.py --sync zero2 --optimizer adamw

zero1 all-reduces the whole gradient, but each rank then reads only its own slice of it.
An all-reduce is a reduce-scatter (each rank ends with the sum of one slice) followed by an
all-gather (every rank gets every slice); zero2 stops after the first half:

    1. reduce-scatter the flat gradient              each rank: the average of its slice only
    2. optimizer.step() on this rank's slice
    3. all-gather the slices into the flat parameters (as zero1)

The full gradient is freed as soon as it is reduced, so between the reduce-scatter and the
next backward a rank holds S = ceil(P / W) gradient elements, not P. Traffic per step is
a reduce-scatter and an all-gather of W x S elements, (W-1) x S each: 2(W-1)/W x P when W
divides P, exactly what DDP's all-reduce moves, split around the optimizer step.

Simplification, compared with DeepSpeed's ZeRO-2 and FSDP: backward still produces the
whole gradient (autograd's own .grad tensors) before it is reduced; they reduce bucket by
bucket during backward so that the whole gradient never exists at once. With --grad-accum
the micro-steps before the last accumulate the whole local gradient (DDP's no_sync does
the same), and only the last reduces it.

Mixed precision as zero1's (parallel/zero1.py): the reduce-scatter runs in the reduce dtype
into a slice kept in that dtype; the optimizer gets it in the master's.
"""

from __future__ import annotations

import torch

from comm.communicate import flatten
from comm.compat import reduce_scatter_single
from parallel.base import gradients
from parallel.clip import clip_grad_norm_
from parallel.zero1 import Zero1Sync, reduced_slice, to_master


class Zero2Sync(Zero1Sync):
    """zero1 with the gradient reduce-scattered: each rank keeps only its slice of it."""

    def _grads(self) -> None:
        # This rank's averaged slice; kept only in the master's dtype (zero1.reduced_slice).
        kept = self.size if self.reduce_dtype == self.shard.dtype else 0
        self.grad_shard = self.flat.new_zeros(kept, dtype=self.reduce_dtype)

    def finish_backward(self) -> None:
        used = self._used()  # which parameters some rank gave a gradient
        pad = self.size * self.world_size - self.numel
        flat_grad = flatten([*gradients(self.params), self.flat.new_zeros(pad)])
        for p in self.params:
            p.grad = None  # the whole gradient is freed: from here on only the slice
        grad_shard = reduced_slice(self.grad_shard, self.shard, self.size)
        reduce_scatter_single(grad_shard, flat_grad.to(self.reduce_dtype))
        del flat_grad
        grad_shard.div_(self.world_size)
        # The padding's gradient is dropped; the optimizer gets the master's dtype.
        self._step_pieces(to_master(grad_shard[: self.owned], self.shard), used)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        # Each rank holds its slice of the gradient: the squared norms are summed across ranks.
        return clip_grad_norm_([self.shard], max_norm, sharded=True)

    def after_step(self, optimizer) -> None:
        self.gather_params()
