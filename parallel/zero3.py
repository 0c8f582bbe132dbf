"""ZeRO stage 3 by hand (FSDP's idea): parameters sharded too, gathered only while in use.

    train_ddp.py --sync zero3 --optimizer adamw

zero2 still keeps every parameter on every rank. zero3 keeps only a 1/W slice of each
*unit* (here: each module that owns parameters directly, a Conv2d, a Linear) and rebuilds
the whole unit just before it is needed:

    forward   pre-hook:  all-gather the unit's slices into its flat buffer; compute
              post-hook: free the flat buffer (storage resized to 0 bytes)
    backward  when the gradient of the unit's output arrives, before the unit's backward:
              all-gather again (the saved activations need the weights back)
              when the last of its parameters' gradients is accumulated:
              reduce-scatter the flat gradient into this rank's slice, free both
    step      optimizer.step() on this rank's slices only; nothing to gather afterwards:
              the next forward gathers each unit when it gets there

So between steps a rank holds sum over units of ceil(P_u / W) parameter elements (the
slices, padded per unit) and during forward and backward one unit more. Traffic per step:
per unit, two all-gathers and one reduce-scatter of W x ceil(P_u / W) elements, (W-1)/W
each: 3(W-1)/W x P when W divides every P_u, half as much again as DDP.

The parameters stay the model's own nn.Parameter objects; only their storage comes and goes:
each is a view into its unit's flat buffer, and freeing resizes that buffer's storage to zero
bytes, so the views (and the tensors autograd saved for backward, which are the same views)
see the gathered values again once it is refilled. This is how FSDP's first version did it;
FSDP2 (`fully_shard`, the library twin, parallel/torch_twins.py) swaps DTensor parameters
instead. Between steps nothing may read the parameters: `consolidated()` gathers every unit
for evaluation and checkpoints. A unit whose module runs twice in one forward (weight
sharing) is not supported.

Gathering a unit is a collective, so every rank must run the same modules in the same order
(FSDP requires the same): a branch that some ranks take and others skip hangs in its
all-gather. A module that every rank skips, or a parameter frozen mid-run, is fine: its unit
is reduced at finish_backward with zeros, the used map (parallel/base.used_anywhere) says no
rank had a gradient, and its pieces keep `grad is None`, so the optimizer does not step them.
Mixed precision (`Precision`, as parallel/zero1.py): the slice this rank keeps is the float32
master; the gathered unit is in the param dtype (so the all-gathers move e_param bytes per
element and forward and backward compute in it); the reduce-scatter runs in the reduce dtype
and the optimizer gets the slice's gradient in the master's dtype. `consolidated()` points
the parameters at the gathered masters instead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.communicate import flatten
from comm.compat import all_gather_single, reduce_scatter_single
from parallel.base import GradientSync, gradients, used_anywhere
from parallel.clip import clip_grad_norm_
from parallel.zero1 import (
    FULL,
    Precision,
    ShardOptimizer,
    cast_inputs,
    flat_views,
    grads_to_pieces,
    pieces_of,
    reduced_slice,
    shard_range,
    to_master,
)


class Unit:
    """One module's parameters: a flat buffer that is gathered and freed, and this rank's
    padded slice of it, which the optimizer steps (without the padding)."""

    def __init__(
        self,
        module: nn.Module,
        world_size: int,
        rank: int,
        precision: Precision = FULL,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """`world_size` and `rank` are those of `group`, the ranks the unit is sharded over
        (None: every rank; parallel/hsdp.py: the ranks of one node)."""
        self.module = module
        self.group = group
        self.params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        self.world_size = world_size
        self.numel = sum(p.numel() for p in self.params)
        self.size, start, owned = shard_range(self.numel, world_size, rank)
        self.full = self.params[0].new_zeros(self.size * world_size)
        flat_views(self.params, self.full)
        self.padded = self.full[start : start + self.size].clone()  # kept: this rank's slice
        self.shard = nn.Parameter(self.padded[:owned])  # this rank's real elements
        self.pieces = pieces_of(self.params, self.shard, start)  # what the optimizer steps
        self.present = [False] * len(self.params)  # which got a gradient here (at reduce)
        compute, reduce = precision.dtypes(self.full.dtype)
        if compute != self.full.dtype:  # the gathered unit in the low dtype
            self.full = self.full.to(compute)
            flat_views(self.params, self.full)
        # Kept only in the master's dtype (zero1.reduced_slice).
        kept = self.size if reduce == self.shard.dtype else 0
        self.grad_shard = self.full.new_zeros(kept, dtype=reduce)
        self.ready = 0  # parameters whose gradient this backward has accumulated
        self.reduced = False
        self._bytes = self.full.untyped_storage().nbytes()
        self.free()

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def gather(self) -> None:
        if not self.gathered:
            self.full.untyped_storage().resize_(self._bytes)
            with torch.no_grad():
                all_gather_single(self.full, self.padded.to(self.full.dtype), group=self.group)

    def free(self) -> None:
        self.full.untyped_storage().resize_(0)

    def point_at_master(self) -> None:
        """Mixed precision, consolidated(): the parameters become views of every rank's
        master slice, gathered; `flat_views(unit.params, unit.full, copy=False)` undoes it."""
        master = self.padded.new_zeros(self.size * self.world_size)
        with torch.no_grad():
            all_gather_single(master, self.padded, group=self.group)
        flat_views(self.params, master, copy=False)

    def reduce(self) -> None:
        """Average the unit's gradient across ranks, keep this rank's slice, free the rest."""
        self.present = [p.grad is not None for p in self.params]  # before the zeros
        pad = self.full.new_zeros(self.size * self.world_size - self.numel)
        flat_grad = flatten([*gradients(self.params), pad])
        for p in self.params:
            p.grad = None
        grad_shard = reduced_slice(self.grad_shard, self.shard, self.size)
        self.average(grad_shard, flat_grad.to(grad_shard.dtype))
        self.shard.grad = to_master(grad_shard[: self.shard.numel()], self.shard)
        self.reduced = True

    def average(self, grad_shard: torch.Tensor, flat_grad: torch.Tensor) -> None:
        """This rank's slice of the average of every rank's `flat_grad`, into `grad_shard`."""
        reduce_scatter_single(grad_shard, flat_grad, group=self.group)
        grad_shard.div_(self.world_size)


class Zero3Sync(GradientSync):
    """Parameters, gradients and optimizer state sharded; units gathered while in use."""

    sharded = True

    def __init__(self, model: nn.Module, precision: Precision = FULL) -> None:
        super().__init__(model)  # every rank starts from rank 0's parameters
        self.units = [
            self.make_unit(m, precision)
            for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self.mixed = self.units[0].full.dtype != self.units[0].padded.dtype
        if self.mixed:
            model.register_forward_pre_hook(cast_inputs(lambda: self.units[0].params[0].dtype))
        self.held = False  # inside consolidated(): every unit stays gathered
        self.on_gather = None  # test hook: called after each gather (the memory oracle)
        self.optimizer: ShardOptimizer | None = None
        for unit in self.units:
            unit.module.register_forward_pre_hook(functools.partial(self._before, unit))
            unit.module.register_forward_hook(functools.partial(self._after, unit))
            for p in unit.params:
                p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, unit))

    def make_unit(self, module: nn.Module, precision: Precision) -> Unit:
        """`module`'s unit, sharded over every rank (parallel/hsdp.py: over one node)."""
        return Unit(module, dist.get_world_size(), dist.get_rank(), precision)

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        self.optimizer = ShardOptimizer([(u.shard, u.pieces) for u in self.units], cls, kwargs)
        return self.optimizer

    def _gather(self, unit: Unit) -> None:
        if not self.held:
            unit.gather()
            if self.on_gather:
                self.on_gather()

    def _before(self, unit: Unit, module: nn.Module, args) -> None:
        self._gather(unit)

    def _after(self, unit: Unit, module: nn.Module, args, output) -> None:
        if self.held:
            return
        unit.free()
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # Fires when the gradient of the output is complete: the unit's backward is next.
            output.register_hook(lambda grad: self._gather(unit))

    def _grad_ready(self, unit: Unit, param: nn.Parameter) -> None:
        unit.ready += 1
        if unit.ready < len(unit.params):
            return
        unit.ready = 0
        if self.syncing:
            unit.reduce()
        if not self.held:
            unit.free()

    def finish_backward(self) -> None:
        # A unit with a parameter that got no gradient in this backward is not reduced yet:
        # reduce it now, with zeros for the missing gradients, as every rank must.
        for unit in self.units:
            if not unit.reduced:
                unit.reduce()
            unit.reduced, unit.ready = False, 0
            if not self.held:
                unit.free()
        # Which parameters some rank had a gradient for: one all-reduce for every unit.
        params = [p for unit in self.units for p in unit.params]
        used = used_anywhere(params, [x for unit in self.units for x in unit.present])
        for unit in self.units:
            mine, used = used[: len(unit.params)], used[len(unit.params) :]
            grads_to_pieces(unit.pieces, unit.shard.grad, mine)  # the master dtype

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        with super().no_sync():
            yield
        for unit in self.units:  # count the next backward's gradients from zero
            unit.ready = 0

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        # Each rank holds its slice of every unit's gradient: squared norms summed across the
        # ranks the units are sharded over (each slice once).
        shards = [unit.shard for unit in self.units]
        return clip_grad_norm_(shards, max_norm, sharded=True, group=self.units[0].group)

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        """Every unit gathered for the block (evaluation, the checksum); freed after."""
        for unit in self.units:
            unit.gather()
            if self.mixed:
                unit.point_at_master()
        self.held = True
        try:
            with super().consolidated(optimizer):
                yield
        finally:
            self.held = False
            for unit in self.units:
                if self.mixed:
                    flat_views(unit.params, unit.full, copy=False)
                unit.free()

    def flat_shards(self) -> dict[str, tuple[nn.Parameter, int]]:
        """As Zero1Sync.flat_shards: one flat vector per unit."""
        return {f"unit{i}": (unit.shard, unit.numel) for i, unit in enumerate(self.units)}

    def after_load(self) -> None:
        # Each unit is gathered from its (just loaded) slices when next used.
        if self.optimizer is not None:
            self.optimizer.after_load()
