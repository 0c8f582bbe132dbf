"""The checks a loaded checkpoint passes before any of it is used: a checkpoint is untrusted
input, and `weights_only=True` only guarantees that loading it ran no code, not that what it
holds has the types and ranges the resume will read.

`check_contents` covers the tensors a single file holds (the model's finite weights, the
optimizer and RNG states), whatever reads it; `check_counters` the counters and flags a
resume computes with (files and sharded folders alike), and `check_position` what depends
on the run resuming it (the step counters against its steps per epoch). Each raises a
CheckpointError naming the file and the entry, before any state is restored and before the
run writes anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint.contents import CheckpointError
from training.guard import non_finite

# Counters the resume reads, and their least value.
COUNTERS = {"epoch": 0, "step": 0, "step_in_epoch": 0, "world_size": 1}
# Entries of `args` that the resume computes with (check_same_batches), and their least value.
ARGS = {"batch_size": 1, "grad_accum": 1}


def _whole(value, least: int) -> bool:
    # bool is an int to Python; a checkpoint's True is not a step count.
    return type(value) is int and value >= least


def check_counters(state: dict, source: Path | str) -> None:
    """The counters and `args` entries, as every checkpoint kind (one file, sharded) has them."""
    for key, least in COUNTERS.items():
        if key not in state:
            raise CheckpointError(f"{source}: not a training checkpoint of this project (no {key})")
        if not _whole(state[key], least):
            raise CheckpointError(
                f"{source}: {key} is {state[key]!r}, not a whole number of at least {least}"
            )
    args = state.get("args")
    if not isinstance(args, dict):
        raise CheckpointError(f"{source}: args is a {type(args).__name__}, not the run's flags")
    for key, least in ARGS.items():
        if not _whole(args.get(key), least):
            raise CheckpointError(
                f"{source}: args.{key} is {args.get(key)!r}, not a whole number of at least {least}"
            )
    if not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{source}: scheduler state is missing or malformed")


def check_sizes(tensors, source: Path | str, what: str) -> None:
    """Each tensor of `tensors` ((name, tensor) pairs) is dense and spans no more bytes than
    its storage holds, checked from its sizes alone, before any value is read. A view can
    repeat a small storage (stride 0: `expand`): 3 MB of file that reads as 10 GB of values
    when a check such as the nan scan below materialises it. torch.load itself refuses a
    storage larger than its record in the file, so what passes here is bounded by the file."""
    for name, value in tensors:
        if not isinstance(value, torch.Tensor):
            continue
        if value.layout != torch.strided:
            raise CheckpointError(f"{source}: {what} {name} is a {value.layout} tensor, not dense")
        span = value.numel() * value.element_size()
        held = value.untyped_storage().nbytes()
        if span > held:
            raise CheckpointError(
                f"{source}: {what} {name} has shape {list(value.shape)} ({span} bytes) over "
                f"{held} bytes of data: a view that repeats its data, not a saved tensor"
            )


def check_contents(state: dict, source: Path | str) -> None:
    """What a single-file checkpoint holds besides its counters: the model, the optimizer
    and RNG states (the counters and `args`: `check_counters`, when a run resumes it). Sizes
    first (`check_sizes`), values after."""
    model = state["model"]
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        raise CheckpointError(f"{source}: model is not a state_dict of named tensors")
    check_sizes(model.items(), source, "weight")
    bad = non_finite(model.items())
    if bad is not None:
        raise CheckpointError(
            f"{source}: weight {bad} holds nan or inf: the run that wrote it had diverged"
        )
    optimizer = state["optimizer"]
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(s, dict) for s in optimizer["state"].values())
    ):
        raise CheckpointError(f"{source}: optimizer state is malformed")
    entries = [
        (f"{index}.{name}", value)
        for index, entry in optimizer["state"].items()
        for name, value in entry.items()
    ]
    check_sizes(entries, source, "optimizer state")
    bad = non_finite(entries)
    if bad is not None:
        raise CheckpointError(f"{source}: optimizer state {bad} holds nan or inf")
    for key in ("rng", "scaler"):
        value = state.get(key)
        if not (isinstance(value, dict) or (key == "scaler" and value is None)):
            raise CheckpointError(f"{source}: {key} state is malformed")


def check_position(state: dict, steps_per_epoch: int, source: Path | str) -> None:
    """The counters must name a place in this run: `step_in_epoch` inside an epoch of
    `steps_per_epoch` steps, and `step` the steps before it. Every checkpoint this project
    writes has step == epoch x steps_per_epoch + step_in_epoch, whatever the world size (the
    samples per step are the same, check_same_batches, and so are the steps per epoch)."""
    epoch, step, inside = state["epoch"], state["step"], state["step_in_epoch"]
    if inside >= steps_per_epoch or step != epoch * steps_per_epoch + inside:
        raise CheckpointError(
            f"{source}: its counters (epoch {epoch}, step {step}, step_in_epoch {inside}) do "
            f"not fit this run's {steps_per_epoch} steps per epoch; a checkpoint of this run "
            "has step = epoch x steps per epoch + step_in_epoch"
        )
