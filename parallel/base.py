"""Gradient synchronisation strategies behind `train_ddp.py --sync`.

A strategy holds the model that the training loop calls (for ddp and torch-zero1, the DDP
model that train_ddp.py built in plain sight) and decides when gradients (or parameters) cross the
network. The loop only ever does:

    with sync.no_sync():            # micro-steps of gradient accumulation, except the last
        loss(sync.model(x)).backward()
    loss(sync.model(x)).backward()  # the last micro-step
    sync.finish_backward()          # gradients are averaged across ranks when this returns
    optimizer.step()
    sync.after_step(optimizer)
    with sync.consolidated(optimizer):  # evaluation, checkpoints
        ...

The modes, from the library's to the most hand-made:

- `ddp`: DistributedDataParallel's own reducer, the reference every other mode is tested
  against.
- `allreduce`: a plain model; after backward, one `communicate()` call averages every
  gradient. Correct and simple, but the network idles during backward and backward idles
  during the all-reduce.
- `overlap`: what DDP does, in Python. Gradients are grouped into buckets (in reverse
  order of definition, roughly the order backward produces them); a hook on each parameter
  counts the gradients that are ready and launches a bucket's all-reduce the moment its
  last gradient arrives, while backward goes on computing the earlier layers.
  `finish_backward()` waits for the buckets still in flight.
- `local-sgd`: no gradient is communicated at all. Every rank steps on its own gradients
  and every K optimizer steps the replicas are averaged: parameters, floating-point
  buffers and the optimizer's per-parameter state (SGD momentum). K = 1 with plain SGD is
  the same computation as the other modes; larger K trades accuracy per step for K times
  less communication.
- The sharded modes, each on its own page: `zero1` (optimizer state sharded), `zero2` (and
  gradients), `zero3` (and parameters, gathered per module while in use), and their library
  twins `torch-zero1` (ZeroRedundancyOptimizer) and `fsdp2` (fully_shard). The optimizer
  comes from `sync.make_optimizer()`, since each rank steps only its own shard.

A parameter that gets no gradient keeps `grad is None` semantics in every mode, as in one
process and under DDP with find_unused_parameters=True (`--find-unused-parameters`): one that
no rank gave a gradient is not stepped and its optimizer state does not move; one that only
some ranks gave a gradient is averaged as DDP averages it, zeros from the others, divided by
the world size. The hand-made modes send zeros for the missing gradients, so that every rank
hands the collective the same tensors, and agree which parameters had one anywhere with one
small all-reduce per step (`used_anywhere`).

Every mode starts from rank 0's parameters and buffers (DDP broadcasts them when it wraps
the model; the others call `broadcast_state`), so replicas are equal even if a rank's
initialisation differed. `consolidated()` gives every rank the same model for evaluation
and checkpoints without changing what training does next.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.communicate import (
    communicate,
)


class Sync:
    """Base strategy: the model is used as it is and nothing is communicated."""

    # True for the modes where each rank holds only a shard of the training state: their
    # checkpoints are written shard by shard (training/sharded.py).
    sharded = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.syncing = True  # False inside no_sync(): the micro-steps of an accumulation

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward of an accumulation micro-step: no gradient is communicated."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        """The optimizer `cls(params, **kwargs)` over what this rank steps: every parameter
        here, only this rank's shard in the sharded modes."""
        return cls(self.model.parameters(), **kwargs)

    def finish_backward(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """After finish_backward(): clip the gradients the optimizer steps by their global
        2-norm and return the norm before clipping (parallel/clip.py: what each mode pays).
        Here every rank holds whole gradients (local-sgd: its own), so nothing is sent."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def after_step(self, optimizer) -> None:
        pass

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        """Inside the block every rank holds the same model, parameters and buffers: the one
        to evaluate, save or report (the checkpoint holds rank 0's copy). Training goes on
        afterwards exactly as if the block had not run, so evaluating or saving a checkpoint
        never changes the trajectory."""
        yield

    def rank_state(self, optimizer) -> dict:
        """What a checkpoint must keep of this rank besides the shared model (local-sgd: the
        replica it is training alone)."""
        return {}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        """Continue from a checkpoint: this rank's `rank_state()` (None when the checkpoint
        has none for it) and the number of optimizer steps already taken."""


def broadcast_state(model: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's, as DDP does on wrapping."""
    state = [*model.parameters(), *model.buffers()]
    communicate(state, functools.partial(dist.broadcast, src=0))


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) replace everyone's."""
    buffers = list(model.buffers())
    if buffers:
        communicate(buffers, functools.partial(dist.broadcast, src=0))


class GradientSync(Sync):
    """What the hand-made modes that average gradients every step share with DDP: they start
    from rank 0's parameters and buffers, and broadcast rank 0's buffers when DDP would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        broadcast_state(model)
        self._buffers_due = True
        if any(True for _ in model.buffers()):  # models without buffers pay nothing
            model.register_forward_pre_hook(self._before_forward)
            model.register_forward_hook(self._after_forward)

    # DDP (broadcast_buffers=True) broadcasts rank 0's buffers before a training forward
    # that follows a synchronising one (torch/nn/parallel/distributed.py,
    # require_forward_param_sync): with --grad-accum K, at the first of the K micro-steps
    # of every optimizer step, not at each. Forwards in eval mode (evaluation) never
    # communicate: the ranks' eval shards differ in length.
    def _before_forward(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and self._buffers_due:
            broadcast_buffers(module)

    def _after_forward(self, module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._buffers_due = self.syncing

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        broadcast_buffers(self.model)  # as DDPSync: what the next training forward does
        yield


def gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients; a parameter that got none gets zeros, so that every rank
    hands the collective the same list of tensors (DDP's bucket holds zeros for it too).
    Call `used_anywhere` first and `drop_unused` after the collective, so that a parameter
    no rank produced a gradient for ends with None again."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def used_anywhere(params: list[nn.Parameter], present: list[bool] | None = None) -> list[bool]:
    """Which of `params` got a gradient on at least one rank; `present`: which got one here
    (None: those whose .grad is not None).

    One all-reduce of an int32 per parameter tensor per optimizer step (4 bytes each: 32
    bytes for the default cnn's 8 tensors; nothing under no_sync), DDP's own price for the
    same question: with find_unused_parameters=True its reducer all-reduces a `local_used_map`
    of the same shape. No rank can skip it, even one whose every parameter got a gradient:
    it cannot know that its peers' did too. The sum counts the ranks that had a gradient; a
    parameter at 0 had none anywhere and is not stepped, as in one process. One used on some
    ranks only is averaged as DDP averages it: the sum over the ranks that have it, plus
    zeros, divided by the world size."""
    if present is None:
        present = [p.grad is not None for p in params]
    if not params:
        return []
    counts = torch.tensor(present, dtype=torch.int32, device=params[0].device)
    dist.all_reduce(counts)
    return [bool(c) for c in counts.tolist()]


def drop_unused(params: list[nn.Parameter], used: list[bool]) -> None:
    """After the collective: the zeros `gradients` wrote for a parameter that no rank had a
    gradient for become None again, so the optimizer skips it (no weight decay, no momentum,
    no Adam moments or step count), as DDP and one process do."""
    for p, u in zip(params, used, strict=True):
        if not u:
            p.grad = None
