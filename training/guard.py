"""What stops a run that would otherwise go wrong silently.

- Ranks started with different flags (`check_same_flags`): each would train its own run,
  or meet the others in collectives of different sizes and wait until --timeout. One small
  collective at start-up, before any other, compares them.
- A loss that is no longer finite (`LossWatch`, `check_finite`): a diverged run would log
  `loss nan` to the end, save checkpoints of nan weights and let rotation delete the last
  good ones. It stops with one line naming the step and the flag to change, before any
  checkpoint with non-finite weights is written.
- `strict_json`: summary.json holds null where a number is not finite (nan, inf), so that
  strict JSON parsers read it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from core.dist import DistEnv
from core.errors import UsageError

# Flags that name this node's own resources: they may differ between nodes of one job.
LOCAL_FLAGS = ("data_dir", "workers")


def check_same_flags(args: argparse.Namespace, env: DistEnv) -> None:
    """Every rank must run with the same flags (LOCAL_FLAGS aside); else one line naming
    each flag that differs and which ranks have which value, raised on every rank.

    One all_gather_object of the parsed flags, the first collective of the run: every rank
    calls it at the same point whatever its flags, so a mismatch ends the job within seconds
    instead of hanging in the first collective whose size or count differs."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = {k: v for k, v in sorted(vars(args).items()) if k not in LOCAL_FLAGS}
    views: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    differ = []
    for key in sorted(set().union(*views)):
        values: dict[str, list[int]] = {}
        for rank, view in enumerate(views):
            values.setdefault(repr(view.get(key)), []).append(rank)
        if len(values) > 1:
            flag = "--" + key.replace("_", "-")
            sides = "; ".join(f"{_ranks(r)}: {v}" for v, r in values.items())
            differ.append(f"{flag} ({sides})")
    if differ:
        raise UsageError(
            f"the ranks were started with different flags: {', '.join(differ)}; every rank "
            "needs the same command line"
        )


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:6])) + (f", ... ({len(ranks)})" if len(ranks) > 6 else "")
    return ("rank " if len(ranks) == 1 else "ranks ") + shown


class Diverged(UsageError):
    """Training produced a non-finite loss or weights: the flags, not the code, must change."""


def advice(args: argparse.Namespace | dict | None) -> str:
    """Which flags to change after a divergence."""
    a = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    lr = a.get("lr")
    hint = f"lower --lr (now {lr:g})" if isinstance(lr, float) else "lower --lr"
    if not a.get("warmup_steps"):
        hint += " or add --warmup-steps"
    return hint


class LossWatch:
    """Notes, without waiting for the device, the first step whose loss is not finite
    (`see`, every micro-batch); `check` stops the run at the next log line, where every rank
    holds the same all-reduced loss and so takes the same decision (no extra collective: a
    rank that stopped alone would leave its peers waiting in the next all-reduce).

    Under --amp fp16 an overflowing loss is expected now and then: the GradScaler skips that
    step and the weights stay finite. There the loss alone stops nothing, and
    `check_finite` still keeps non-finite weights out of every checkpoint."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.enabled = args.amp != "fp16"
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def see(self, loss: torch.Tensor, step: int) -> None:
        """`loss` was computed in optimizer step `step` (counted from 1)."""
        if not self.enabled:  # fp16: check() would not look at it
            return
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(bad, step, self.first)

    def check(self, reduced_loss: float, step: int) -> None:
        """`reduced_loss`: the mean loss over every rank since the last log line."""
        if math.isfinite(reduced_loss) or not self.enabled:
            return
        first = int(self.first.item())
        at = f"step {first}" if first > 0 else f"a step up to {step}"
        raise Diverged(
            f"training diverged: the loss is {reduced_loss} at {at}; {advice(self.args)} and "
            "start again (no checkpoint with non-finite weights was written)"
        )


def non_finite(tensors: Iterable) -> str | None:
    """The name of the first floating-point tensor in `tensors` ((name, tensor) pairs) that
    holds a nan or an inf, or None."""
    for name, value in tensors:
        if (
            isinstance(value, torch.Tensor)
            and (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())
        ):
            return name
    return None


def check_finite(model_state: dict, step: int, args) -> None:
    """Refuse to checkpoint non-finite weights: it would become the newest checkpoint, and
    rotation would delete the last good one."""
    name = non_finite(model_state.items())
    if name is not None:
        raise Diverged(
            f"training diverged: weight {name} is not finite after step {step}; "
            f"{advice(args)} and start again (the checkpoints written so far are kept, none "
            "with non-finite weights)"
        )


def strict_json(value):
    """`value` with every non-finite float replaced by None, so that json.dumps(...,
    allow_nan=False) accepts it (JSON has no nan or inf: Python writes the invalid NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value
