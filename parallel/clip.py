"""Gradient clipping under data parallelism: `--clip-grad-norm X` in both training scripts.

    python train_dp.py --clip-grad-norm 1.0
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 train_ddp.py --clip-grad-norm 1.0

Clipping by norm scales the gradient g of one optimizer step by min(1, X / ||g||), where
||g|| is the 2-norm of every parameter's gradient taken together. Where it goes decides
which g that is, and only one place gives the gradient one process would clip:

- once per optimizer step, after the last micro-batch of a --grad-accum: the norm of a
  micro-batch's share is not the norm of the sum;
- after the gradients are synchronised: before it, each rank would clip its own gradient
  by its own norm, and the average of clipped gradients is not the clipped average;
- after `scaler.unscale_(optimizer)` with fp16: the scaled gradient's norm is the true one
  times the loss scale, so X would mean something else at every scale.

pitfalls/clip_grad.py shows the first two mistakes against a one-process oracle.

What "the norm" costs in each --sync mode (Sync.clip_grad_norm_):

- ddp, allreduce, overlap, torch-zero1, zero1: every rank holds the whole averaged gradient
  (zero1 keeps it, as one flat buffer, until after the step), so the norm needs no
  communication and every rank computes the same one.
- zero2, zero3: each rank holds the averaged gradient of its own slice only. The global
  norm is sqrt(sum over ranks of each slice's sum of squares): one all-reduce of one number,
  then every rank scales its slice by the same factor. Reducing the norms themselves (not
  their squares), reducing twice, or clipping by the local slice's norm are the bugs.
- fsdp2: the gradients are DTensors sharded along their first dimension; torch's
  `get_total_norm` over them makes one all-reduce (a Partial norm reduced to a Replicate
  one, measured with CommDebugMode on torch 2.14); `full_tensor()` then costs nothing (it
  would make that one reduction where a torch version left the norm Partial), and the clip
  itself gets a plain number: never a second reduction (torchtitan's `clip_grad_norm_`
  does the same).
- local-sgd: there is no gradient sync, so each rank clips its *own* gradient by its own
  norm (what the log shows is rank 0's). The replicas then step with different
  factors, which their next averaging blends; with clipping active the run is not the
  one-process run, even with --sync-every 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    *,
    sharded: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale the gradients of `params` so that their global 2-norm is at most `max_norm`;
    return the norm before clipping (a plain tensor; the same on every rank unless each
    holds a gradient of its own, as under local-sgd).

    `sharded`: each rank holds a different slice of the gradient (zero2, zero3): the squares
    of the local norms are summed across the ranks of `group` (None: every rank), in one
    all-reduce; hsdp's group is one node, whose slices make up the whole gradient once.
    DTensor gradients (fsdp2) are recognised by their type."""
    params = list(params)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the global norm as a plain tensor, for the clip and log
    elif sharded:
        squares = norm.square()
        dist.all_reduce(squares, group=group)  # the sum of squares over every slice: once
        norm = squares.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class GradClip:
    """--clip-grad-norm in the training loop: called once per optimizer step between the
    gradient sync and `scaler.step(optimizer)`; keeps the pre-clip norms for the log.

    The norms stay on the device (reading one would wait for the GPU every step); the log
    line reads them every --log-every steps. Off (max_norm 0) it does nothing at all."""

    def __init__(self, max_norm: float, model: nn.Module, device: torch.device, sync=None) -> None:
        """Clips `model`'s gradients, or with train_ddp.py's --sync strategy `sync`'s (the
        sharded modes hold slices of them: see the module doc)."""
        self.max_norm = max_norm
        self.model, self.sync = model, sync
        # [largest pre-clip norm, steps clipped, steps], since the last log line and over the
        # steps this process has run (a resumed run counts from its restart).
        self._window = torch.zeros(3, dtype=torch.float64, device=device)
        self._run = torch.zeros(3, dtype=torch.float64, device=device)
        self._last = torch.zeros((), dtype=torch.float64, device=device)

    def __call__(self, optimizer, scaler) -> None:
        """Clip the gradients `optimizer` is about to apply (GradScaler `scaler` unscales them
        first; a disabled scaler does nothing)."""
        if not self.max_norm:
            return
        scaler.unscale_(optimizer)  # fp16: the true gradient, not the loss-scaled one
        if self.sync is None:
            norm = clip_grad_norm_(self.model.parameters(), self.max_norm)
        else:
            norm = self.sync.clip_grad_norm_(self.max_norm)
        self._last = norm.detach().to(torch.float64)
        for stats in (self._window, self._run):
            stats[0] = torch.maximum(stats[0], self._last)
            stats[1] += self._last > self.max_norm
            stats[2] += 1

    def log(self, run, step: int) -> None:
        """One log line and TensorBoard scalars about the steps since the last call."""
        if not self.max_norm:
            return
        largest, clipped, steps = self._window.tolist()
        self._window.zero_()
        last = self._last.item()
        run.info(
            "step %d  grad norm %.4g  largest %.4g  clipped %d of %d steps (--clip-grad-norm %g)",
            step,
            last,
            largest,
            clipped,
            steps,
            self.max_norm,
        )
        run.scalars(
            step,
            **{
                "train/grad_norm": last,
                "train/grad_norm_max": largest,
                "train/clipped_fraction": clipped / max(steps, 1.0),
            },
        )

    def summary(self) -> dict:
        """summary.json's keys (none when clipping is off)."""
        if not self.max_norm:
            return {}
        largest, clipped, steps = self._run.tolist()
        return {
            "clip_grad_norm": self.max_norm,
            "grad_norm_max": largest,
            "clipped_steps": int(clipped),
            "grad_norm_steps": int(steps),
        }
