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

The optimizer steps this rank's slice one parameter at a time (`ShardOptimizer`: torch's own
optimizer over each parameter's piece of the slice), so that a parameter no rank gave a
gradient is skipped as in one process and DDP: its piece keeps `grad is None`, so no weight
decay, momentum or Adam moment moves it and its Adam step count stays its own. Which
parameters had a gradient anywhere costs one all-reduce of an int32 per parameter tensor
(parallel/base.used_anywhere).

The parameters and gradients live in one flat buffer each (the idea of comm/communicate.py,
kept for the whole run rather than rebuilt per call): every `p` and `p.grad` is a view into
them, so the all-reduce and the all-gather run in place, with no copy in or out. The flat
buffer is padded to W x S so that every rank's slice has the same size, as all-gather needs.
The optimizer is given this rank's slice *without* the padding (a view of length
`owned <= S`): the padding is never stepped and never has optimizer state.

Traffic per step: an all-reduce of P elements, 2(W-1)/W x P, plus an all-gather of W x S,
(W-1) x S: 3(W-1)/W x P when W divides P, half as much again as DDP (and the few bytes of
the used map). zero2 (parallel/zero2.py)
brings it back to DDP's by reduce-scattering instead of all-reducing.

Mixed precision (`--param-dtype bfloat16|float16`, `--reduce-dtype`; `Precision`), as FSDP2's
MixedPrecisionPolicy: the optimizer steps a float32 *master* copy of this rank's slice (its
own tensor, S elements), while the model's parameters are views into a flat buffer in the
low dtype, which forward and backward compute with (the model's floating-point inputs are
cast to it) and which the all-gather fills (so it moves e_param bytes per element). Autograd
produces the gradients in the low dtype; they cross the network in the reduce dtype (unset:
the param dtype) and the optimizer is handed this rank's slice in the master's dtype. Between
steps a rank holds W x S low-precision elements and S master ones (2 + 4 bytes instead of 4
with bfloat16); the collectives move e_reduce and e_param bytes per element instead of 4.
There is no loss scaling: float16 gradients below 6e-8 flush to zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.compat import all_gather_single
from parallel.base import GradientSync, used_anywhere


def shard_range(numel: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(S, start, owned): every rank's slice size S = ceil(numel / W), where this rank's slice
    starts in the flat buffer, and how many of its S elements are real (not padding). The
    split is torch.chunk's, which DTensor's Shard(0) also uses: the last ranks own less, or
    nothing."""
    size = math.ceil(numel / world_size)
    start = rank * size
    return size, start, max(0, min(size, numel - start))


def flat_views(params: list[nn.Parameter], flat: torch.Tensor, *, copy: bool = True) -> None:
    """Make each parameter a view of its piece of `flat` (values copied in first, cast to
    flat's dtype, unless `copy` is False)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            if copy:
                flat[offset : offset + n].copy_(p.reshape(-1))
            p.data = flat[offset : offset + n].view_as(p)
            offset += n


def pieces_of(params: list[nn.Parameter], shard: torch.Tensor, start: int) -> list[nn.Parameter]:
    """Each parameter's piece of `shard`, the slice of their flat buffer that begins at
    `start`: a view into it (empty where the parameter lies outside the slice)."""
    pieces, offset = [], 0
    for p in params:
        a = min(max(offset - start, 0), shard.numel())
        b = min(max(offset + p.numel() - start, 0), shard.numel())
        pieces.append(nn.Parameter(shard.detach()[a:b]))
        offset += p.numel()
    return pieces


def grads_to_pieces(pieces: list[nn.Parameter], grad: torch.Tensor, used: list[bool]) -> None:
    """The averaged gradient of a shard (`grad`, from its start) to its pieces: None where no
    rank had a gradient for the piece's parameter, which the optimizer then skips."""
    offset = 0
    for piece, u in zip(pieces, used, strict=True):
        n = piece.numel()
        piece.grad = grad[offset : offset + n].view_as(piece) if u else None
        offset += n


class ShardOptimizer(torch.optim.Optimizer):
    """What zero1/2/3 hand the training loop: torch's `cls` over each parameter's piece of this
    rank's flat shards (`self.optim`), so a piece whose parameter had no gradient on any rank
    (grad None) is skipped, exactly as one process skips the parameter.

    Its own parameters are the flat shards, and its `state[shard]` holds each per-element
    state (momentum, Adam's moments) as one flat tensor that the pieces' states are views of:
    what a sharded checkpoint saves and loads (training/sharded.py), one vector per shard as
    before. Scalar state is per piece (Adam's step: a parameter's own count); the checkpoint
    keeps the number of steps this optimizer took, which every piece gets back on a resume,
    so a resume is exact unless a parameter's gradient came and went before the checkpoint.
    The learning rate and the other hyper-parameters are set on this optimizer (the scheduler,
    a resume) and handed to `self.optim` before each step, as ZeroRedundancyOptimizer does."""

    def __init__(
        self,
        shards: list[tuple[nn.Parameter, list[nn.Parameter]]],
        cls: type[torch.optim.Optimizer],
        kwargs: dict,
    ) -> None:
        self.optim = cls([piece for _, pieces in shards for piece in pieces], **kwargs)
        super().__init__([shard for shard, _ in shards], self.optim.defaults)
        self.shards = shards
        self.steps = 0

    def _views(self) -> Iterator[tuple[nn.Parameter, dict, nn.Parameter, int]]:
        """(a shard, a piece of it, the piece's optimizer state, its offset in the shard)."""
        for shard, pieces in self.shards:
            offset = 0
            for piece in pieces:
                yield shard, piece, self.optim.state[piece], offset
                offset += piece.numel()

    @torch.no_grad()
    def step(self, closure=None):
        settings = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        for group in self.optim.param_groups:
            group.update(settings)
        loss = self.optim.step(closure)
        self.steps += 1
        # A piece's first step creates its per-element state: it moves into the flat tensor.
        for shard, piece, state, offset in self._views():
            flat = self.state[shard]
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if value.dim() == 0:  # Adam's step: the checkpoint keeps this optimizer's
                    flat[key] = torch.tensor(float(self.steps), dtype=value.dtype)
                    continue
                if key not in flat:
                    flat[key] = torch.zeros_like(shard.detach(), dtype=value.dtype)
                view = flat[key][offset : offset + piece.numel()].view_as(piece)
                if value.data_ptr() != view.data_ptr():
                    view.copy_(value)
                    state[key] = view
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.optim.zero_grad(set_to_none)

    def after_load(self) -> None:
        """The flat states were just overwritten (a resume): every piece's state becomes a
        view of them again, and its scalar state (Adam's step) the checkpoint's."""
        for shard, piece, state, offset in self._views():
            state.clear()
            for key, value in self.state[shard].items():
                if value.dim():
                    state[key] = value[offset : offset + piece.numel()].view_as(piece)
                else:
                    state[key] = value.clone()
                    self.steps = int(value.item())


@dataclass(frozen=True)
class Precision:
    """--param-dtype and --reduce-dtype of the sharded modes; None: the parameters' own dtype
    (the master's), and for the reduction the param dtype, as MixedPrecisionPolicy does."""

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None

    def dtypes(self, master: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """(compute, reduce) for parameters kept in `master`."""
        compute = self.param_dtype or master
        return compute, self.reduce_dtype or compute


FULL = Precision()


def cast_inputs(dtype_of):
    """A forward pre-hook casting the floating-point inputs to the parameters' dtype now (the
    low one while training, the master's inside consolidated()): MixedPrecisionPolicy's
    cast_forward_inputs."""

    def hook(module: nn.Module, args):
        dtype = dtype_of()
        return tuple(
            a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args
        )

    return hook


def reduced_slice(kept: torch.Tensor, master: torch.Tensor, size: int) -> torch.Tensor:
    """Where a reduce-scatter leaves this rank's `size` elements: `kept`, the buffer the
    optimizer's gradient is a view of, when it is in the master's dtype (then `kept` has
    `size` elements, else none); in another dtype, a buffer for this step only, freed once
    `to_master` has copied it, so that every byte a rank keeps is behind a .grad, where
    parallel/memory.py counts it."""
    return kept if kept.dtype == master.dtype else kept.new_empty(size)


def to_master(grad: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """This rank's reduced gradient slice as the optimizer needs it: in the master's dtype."""
    return grad if grad.dtype == master.dtype else grad.to(master.dtype)


class Zero1Sync(GradientSync):
    """Sharded optimizer state; gradients all-reduced; stepped slices all-gathered."""

    sharded = True  # checkpoints go through training/sharded.py, one shard per rank

    def __init__(self, model: nn.Module, precision: Precision = FULL) -> None:
        super().__init__(model)  # every rank starts from rank 0's parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.numel = sum(p.numel() for p in self.params)
        self.size, self.start, self.owned = shard_range(self.numel, self.world_size, self.rank)
        first = self.params[0]
        self.compute_dtype, self.reduce_dtype = precision.dtypes(first.dtype)
        self.flat = first.new_zeros(self.size * self.world_size)
        flat_views(self.params, self.flat)
        # What the optimizer steps: this rank's real elements, a view into the flat buffer,
        # so a step updates the model's own parameters in place; one piece per parameter.
        self.shard = nn.Parameter(self.flat[self.start : self.start + self.owned])
        self.mixed = self.compute_dtype != first.dtype
        if self.mixed:  # the master slice becomes its own tensor; the model computes low
            self.shard = nn.Parameter(self.shard.detach().clone())
            self.flat = self.flat.to(self.compute_dtype)
            flat_views(self.params, self.flat)
            model.register_forward_pre_hook(cast_inputs(lambda: self.params[0].dtype))
        self.pieces = pieces_of(self.params, self.shard, self.start)  # views of the master
        self.optimizer: ShardOptimizer | None = None
        self._got = [False] * len(self.params)  # which parameters got a gradient here
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._got.__setitem__(i, True))
        self._grads()

    def _grads(self) -> None:
        """zero1 keeps the whole gradient, as one flat buffer that p.grad are views of:
        autograd accumulates into an existing .grad in place."""
        self.flat_grad = torch.zeros_like(self.flat)
        self._attach_grads()

    def _attach_grads(self) -> None:
        offset = 0
        for p in self.params:
            p.grad = self.flat_grad[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        self.optimizer = ShardOptimizer([(self.shard, self.pieces)], cls, kwargs)
        return self.optimizer

    def _used(self) -> list[bool]:
        """Which parameters got a gradient on some rank in this optimizer step."""
        used = used_anywhere(self.params, self._got)
        self._got = [False] * len(self.params)
        return used

    def _step_pieces(self, grad_shard: torch.Tensor, used: list[bool]) -> None:
        self.shard.grad = grad_shard[: self.owned]  # the padding's gradient is dropped
        grads_to_pieces(self.pieces, grad_shard, used)

    def finish_backward(self) -> None:
        # Only the real P elements cross the network: the padding is all zeros anyway.
        local = self.flat_grad[: self.numel]
        grad = local.to(self.reduce_dtype)  # `local` itself when no cast is asked for
        dist.all_reduce(grad)
        grad.div_(self.world_size)  # gloo has no ReduceOp.AVG
        used = self._used()
        mine = grad[self.start : self.start + self.owned]
        # A view into flat_grad without mixed precision; else a copy of this rank's slice
        # alone, in the master's dtype (a view would keep a whole cast buffer alive).
        keep = grad is local and mine.dtype == self.shard.dtype
        self._step_pieces(mine if keep else mine.to(self.shard.dtype, copy=True), used)
        for p, u in zip(self.params, used, strict=True):
            if not u:
                p.grad = None  # as DDP leaves it; the view comes back after the step

    def gather_params(self) -> None:
        """Every rank's freshly stepped slice into every rank's flat parameters, in place."""
        mine = self.flat[self.start : self.start + self.size]
        with torch.no_grad():
            if self.mixed:  # the stepped master slice, rounded to the compute dtype
                mine[: self.owned].copy_(self.shard)
            all_gather_single(self.flat, mine)

    def after_step(self, optimizer) -> None:
        self.gather_params()
        self.flat_grad.zero_()  # the loop's zero_grad() only reaches the shard's gradient
        self._attach_grads()

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        """With mixed precision, the block sees the master parameters (evaluation, the
        checksum): every rank's master slice gathered into a full-precision flat buffer
        that the parameters point at until the block ends."""
        if not self.mixed:
            with super().consolidated(optimizer):
                yield
            return
        full = self.shard.new_zeros(self.size * self.world_size)
        mine = full[self.start : self.start + self.size]
        with torch.no_grad():
            mine[: self.owned].copy_(self.shard)
            all_gather_single(full, mine)
        flat_views(self.params, full, copy=False)
        try:
            with super().consolidated(optimizer):
                yield
        finally:
            flat_views(self.params, self.flat, copy=False)

    def flat_shards(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Each flat vector this rank steps a slice of, with the vector's length: what a
        sharded checkpoint (training/sharded.py) saves and loads."""
        return {"all": (self.shard, self.numel)}

    def after_load(self) -> None:
        """The shards were just overwritten (a resume): rebuild every rank's parameters."""
        if self.optimizer is not None:
            self.optimizer.after_load()
        self.gather_params()
