"""ZeRO stage 1 by hand: the optimizer state is sharded, everything else is replicated.

    train_ddp.py --sync zero1 --optimizer adamw

DDP keeps on every rank the parameters (P elements), their gradients (P) and the optimizer
state (k x P: AdamW's two moments, k = 2; SGD's momentum, k = 1). But after the all-reduce
every rank holds the same averaged gradient and would compute the same update: stepping all
P elements W times over is wasted work, and the W copies of the optimizer state are wasted
memory. ZeRO-1 lets each rank step only its own contiguous 1/W of the parameters and then
hands the stepped slices round:

    flat parameters   [ rank 0 | rank 1 | ... | rank W-1 |pad]   S = ceil(P / W) each
    1. all-reduce the flat gradient (as DDP does)        every rank: the whole average
    2. optimizer.step() on this rank's slice only         state: S x k elements, not P x k
    3. all-gather the slices into the flat parameters     every rank: the whole new model

The parameters and gradients live in one flat buffer each (the idea of comm/communicate.py,
kept for the whole run rather than rebuilt per call): every `p` and `p.grad` is a view into
them, so the all-reduce and the all-gather run in place, with no copy in or out. The flat
buffer is padded to W x S so that every rank's slice has the same size, as all-gather needs.
The optimizer is given this rank's slice *without* the padding (a view of length
`owned <= S`): the padding is never stepped and never has optimizer state.

Traffic per step: an all-reduce of P elements, 2(W-1)/W x P, plus an all-gather of W x S,
(W-1) x S: 3(W-1)/W x P when W divides P, half as much again as DDP. zero2 (parallel/zero2.py)
brings it back to DDP's by reduce-scattering instead of all-reducing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.compat import all_gather_single
from parallel.base import GradientSync


def shard_range(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(S, start, owned): every rank's slice size S = ceil(numel / W), where this rank's slice
    starts in the flat buffer, and how many of its S elements are real (not padding). The
    split is torch.chunk's, which DTensor's Shard(0) also uses: the last ranks own less, or
    nothing."""
    size = math.ceil(numel / world_size)
    start = rank * size
    return size, start, max(0, min(size, numel - start))


def flat_views(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Make each parameter a view of its piece of `flat` (values copied in first)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat[offset : offset + n].copy_(p.reshape(-1))
            p.data = flat[offset : offset + n].view_as(p)
            offset += n


class Zero1Sync(GradientSync):
    """Sharded optimizer state; gradients all-reduced; stepped slices all-gathered."""

    sharded = True  # checkpoints go through training/sharded.py, one shard per rank

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)  # every rank starts from rank 0's parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.numel = sum(p.numel() for p in self.params)
        self.size, self.start, self.owned = shard_range(self.numel, self.world_size, self.rank)
        first = self.params[0]
        self.flat = first.new_zeros(self.size * self.world_size)
        flat_views(self.params, self.flat)
        # What the optimizer steps: this rank's real elements, a view into the flat buffer,
        # so a step updates the model's own parameters in place.
        self.shard = nn.Parameter(self.flat[self.start : self.start + self.owned])
        self._grads()

    def _grads(self) -> None:
        """zero1 keeps the whole gradient, as one flat buffer that p.grad are views of:
        autograd accumulates into an existing .grad in place."""
        self.flat_grad = torch.zeros_like(self.flat)
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        return cls([self.shard], **kwargs)

    def finish_backward(self) -> None:
        # Only the real P elements cross the network: the padding is all zeros anyway.
        grad = self.flat_grad[: self.numel]
        dist.all_reduce(grad)
        grad.div_(self.world_size)  # gloo has no ReduceOp.AVG
        self.shard.grad = self.flat_grad[self.start : self.start + self.owned]

    def gather_params(self) -> None:
        """Every rank's freshly stepped slice into every rank's flat parameters, in place."""
        mine = self.flat[self.start : self.start + self.size]
        with torch.no_grad():
            all_gather_single(self.flat, mine)

    def after_step(self, optimizer) -> None:
        self.gather_params()
        self.flat_grad.zero_()  # the loop's zero_grad() only reaches the shard's gradient

    def flat_shards(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Each flat vector this rank steps a slice of, with the vector's length: what a
        sharded checkpoint (training/sharded.py) saves and loads."""
        return {"all": (self.shard, self.numel)}

    def after_load(self) -> None:
        """The shards were just overwritten (a resume): rebuild every rank's parameters."""
        self.gather_params()
