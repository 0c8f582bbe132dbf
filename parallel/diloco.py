"""--sync diloco: DiLoCo (Douillard et al., 2023, arXiv:2311.08105). Each rank trains its own
replica for H steps with the inner optimizer (--optimizer), then the ranks average how far
they moved and an outer optimizer takes one step on that average:

    every H steps:   delta  = mean over ranks of (theta_outer - theta_rank)   one all-reduce
                     theta_outer -= outer SGD step on delta (Nesterov momentum)
                     theta_rank   = theta_outer on every rank

`delta` is the "pseudo-gradient": H inner steps' worth of progress, pointing downhill like a
gradient. One all-reduce of the parameters every H steps instead of one of the gradients
every step: 1/H of DDP's bytes (half that again with --outer-dtype bfloat16). The inner
optimizer's state (Adam's moments) stays each rank's own, as in the paper.

With H = 1, outer lr 1, no outer momentum and plain SGD inside, theta_outer - theta_rank is
lr x that rank's gradient and the outer step is DDP's step: tests/test_parallel_diloco.py.

Streaming DiLoCo (Douillard et al., 2025, arXiv:2501.18512), `--diloco-fragments F`: the
parameters are cut into F fragments (consecutive in definition order, of about equal
size), each with its own outer copy, and fragment f is synchronised at the steps where
step % H == (f + 1) x H / F % H: every fragment still every H steps, but at most 1/F of the
parameters cross the network at once, so the peak of each sync shrinks F times. (The paper
also overlaps each fragment's all-reduce with the next inner steps; here it is blocking.)

Checkpoints keep each rank's replica, its inner optimizer state and the outer state
(`rank_state`), so a resume with as many ranks continues exactly; the checkpoint's model is
theta_outer (`consolidated`), the model every rank agrees on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from core.errors import UsageError
from parallel.base import Sync, broadcast_state

DILOCO_EVERY = 8  # --sync-every for diloco when it is not given
OUTER_DTYPES = ("same", "bfloat16")  # same: the parameters' dtype


class DiLoCoSync(Sync):
    """Inner steps alone, an outer Nesterov step on the averaged pseudo-gradient every H."""

    def __init__(
        self,
        model: nn.Module,
        sync_every: int = DILOCO_EVERY,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        fragments: int = 1,
        outer_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not 1 <= fragments <= len(params) or sync_every % fragments:
            raise UsageError(
                f"--diloco-fragments {fragments} must divide --sync-every {sync_every} and be "
                f"at most the model's {len(params)} parameter tensors"
            )
        self.sync_every, self.fragments, self.outer_dtype = sync_every, fragments, outer_dtype
        self.steps = 0  # optimizer steps taken in the run (also before a resume)
        broadcast_state(model)
        self.groups = _fragments(params, fragments)
        with torch.no_grad():
            self.outer = [[p.detach().clone() for p in group] for group in self.groups]
        self.outer_optimizers = [
            torch.optim.SGD(
                outer,
                lr=outer_lr,
                momentum=outer_momentum,
                nesterov=outer_momentum > 0,
            )
            for outer in self.outer
        ]

    def _due(self, step: int) -> list[int]:
        """The fragments synchronised after optimizer step `step` (1-based)."""
        every = self.sync_every // self.fragments
        return [
            f
            for f in range(self.fragments)
            if step % self.sync_every == (f + 1) * every % self.sync_every
        ]

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1
        for f in self._due(self.steps):
            self._outer_step(f)

    @torch.no_grad()
    def _outer_step(self, f: int) -> None:
        local, outer = self.groups[f], self.outer[f]
        deltas = [
            (o - p).to(self.outer_dtype or o.dtype) for o, p in zip(outer, local, strict=True)
        ]
        flat = torch.cat([d.reshape(-1) for d in deltas])
        dist.all_reduce(flat)  # the pseudo-gradients of every rank: the only communication
        flat = flat.to(outer[0].dtype) / dist.get_world_size()
        offset = 0
        for o in outer:
            o.grad = flat[offset : offset + o.numel()].view_as(o).clone()
            offset += o.numel()
        self.outer_optimizers[f].step()
        for o, p in zip(outer, local, strict=True):
            p.copy_(o)
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if f == self.fragments - 1 and buffers:  # BatchNorm statistics: averaged, once per H
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    @contextmanager
    def consolidated(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """theta_outer for the block: what every rank agrees on, evaluated and saved; each rank
        then goes back to its own replica, so evaluating or saving changes nothing."""
        local = [p for group in self.groups for p in group]
        own = [p.detach().clone() for p in local]
        with torch.no_grad():
            for p, o in zip(local, [o for outer in self.outer for o in outer], strict=True):
                p.copy_(o)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, mine in zip(local, own, strict=True):
                    p.copy_(mine)

    def rank_state(self, optimizer: torch.optim.Optimizer) -> dict:
        local = [p for group in self.groups for p in group]
        inner = [
            value
            for p in local
            for value in optimizer.state.get(p, {}).values()
            if torch.is_tensor(value) and value.shape == p.shape
        ]
        momenta = [  # an empty tensor where the outer step has not run yet
            opt.state.get(o, {}).get("momentum_buffer", o.new_empty(0))
            for opt, outer in zip(self.outer_optimizers, self.outer, strict=True)
            for o in outer
        ]
        cpu = lambda ts: [t.detach().cpu().clone() for t in ts]
        return {
            "diloco": {
                "replica": cpu(local),
                "inner": cpu(inner),
                "outer": cpu([o for outer in self.outer for o in outer]),
                "outer_momentum": cpu(momenta),
            }
        }

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.steps = step
        saved = (state or {}).get("diloco")
        local = [p for group in self.groups for p in group]
        outer = [o for group in self.outer for o in group]
        if saved is None:  # another world size wrote it: start from its model, momentum 0
            with torch.no_grad():
                for o, p in zip(outer, local, strict=True):
                    o.copy_(p)
            return
        inner = [
            value
            for p in local
            for value in optimizer.state.get(p, {}).values()
            if torch.is_tensor(value) and value.shape == p.shape
        ]
        fits = lambda got, want: (
            isinstance(got, list)
            and len(got) == len(want)
            and all(
                torch.is_tensor(g) and g.shape == w.shape for g, w in zip(got, want, strict=True)
            )
        )
        if not (
            fits(saved.get("replica"), local)
            and fits(saved.get("inner"), inner)
            and fits(saved.get("outer"), outer)
            and isinstance(saved.get("outer_momentum"), list)
            and len(saved["outer_momentum"]) == len(outer)
            and all(
                torch.is_tensor(m) and m.numel() in (0, o.numel())
                for m, o in zip(saved["outer_momentum"], outer, strict=True)
            )
        ):
            raise UsageError("the checkpoint's diloco state does not fit this model and optimizer")
        with torch.no_grad():
            for t, s in zip(
                local + inner + outer,
                saved["replica"] + saved["inner"] + saved["outer"],
                strict=True,
            ):
                t.copy_(s)
        momenta = iter(saved["outer_momentum"])
        for opt, group in zip(self.outer_optimizers, self.outer, strict=True):
            for o in group:
                momentum = next(momenta)
                if momentum.numel():
                    opt.state[o]["momentum_buffer"] = momentum.to(o.device, o.dtype).view_as(o)


def _fragments(params: list[nn.Parameter], count: int) -> list[list[nn.Parameter]]:
    """`params` cut into `count` runs of consecutive tensors of about equal element count."""
    total = sum(p.numel() for p in params)
    groups, current, seen = [], [], 0
    for i, p in enumerate(params):
        current.append(p)
        seen += p.numel()
        left = len(params) - i - 1
        need = count - len(groups) - 1  # groups still to open after this one
        if need and (seen >= total * (len(groups) + 1) / count or left == need):
            groups.append(current)
            current = []
    groups.append(current)
    return groups
