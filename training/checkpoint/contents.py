"""What a checkpoint holds, and how it goes back into live objects.

One dict: `model` (a plain state_dict: no `module.` or `_orig_mod.` in any key, whatever
wrapped the model when it was saved), `optimizer`, `scheduler`, `scaler`, `epoch`, `step`,
`step_in_epoch`, `world_size`, `args` and `rng` (every generator that can change the run),
plus `ranks`, each rank's own part, added by `CheckpointManager.save` (resume.py).
`training_state` builds it from a live run; `restore_training_state` checks all of it before
it changes anything, then puts it back. How the file is written and read: files.py.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from core.errors import UsageError

REQUIRED = ("model", "optimizer", "epoch", "step", "world_size", "args", "rng")
WRAPPER_ATTRS = {"module", "_orig_mod"}  # DDP / DataParallel, and torch.compile


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or for another model."""


# ---------------------------------------------------------------- wrappers and key names


def _is_wrapper(module: nn.Module) -> bool:
    wrappers: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    # A compiled model exists only once torch._dynamo has been imported; importing it here
    # just to ask would cost every checkpoint save about two seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None:
        wrappers += (eval_frame.OptimizedModule,)
    return isinstance(module, wrappers)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers (any nesting order)."""
    while _is_wrapper(model):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def plain_key(key: str, wrapper_paths: set[str] | None = None) -> str:
    """`key` without the segments that wrappers add.

    With `wrapper_paths` (the dotted names of wrapper modules in a live model), exactly those
    are removed. Without it (a key from a file whose model we cannot see), any `module` or
    `_orig_mod` segment is removed; `load_model_state` only uses that guess when the key as
    written does not fit.
    """
    parts = key.split(".")
    if wrapper_paths is None:
        return ".".join(p for p in parts if p not in WRAPPER_ATTRS)
    out: list[str] = []
    for i, part in enumerate(parts):
        if part in WRAPPER_ATTRS and ".".join(parts[:i]) in wrapper_paths:
            continue
        out.append(part)
    return ".".join(out)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with plain keys, also when wrappers sit inside submodules."""
    wrappers = {name for name, m in model.named_modules() if _is_wrapper(m)}
    return {plain_key(k, wrappers): v for k, v in model.state_dict().items()}


def param_checksum(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in key order: equal iff bit-identical."""
    h = hashlib.sha256()
    for key, value in sorted(model_state(model).items()):
        h.update(key.encode())
        # A copy: .numpy() would pin the tensor's storage to its size for good, and
        # parallel/zero3.py frees parameter storage by resizing it to 0 bytes between uses.
        flat = value.detach().cpu().reshape(-1).clone()
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
    """Load a state_dict saved from any wrapper into `model` (plain, DataParallel or DDP).

    Checks everything before touching a parameter: on a mismatch the model is unchanged and
    the error lists the missing keys, unexpected keys and shape differences.
    """
    model.load_state_dict(match_model_state(model, state, source))


def match_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = ""
) -> dict[str, torch.Tensor]:
    """`state` renamed to `model`'s own keys, or a CheckpointError listing what does not fit."""
    wrappers = {name for name, m in model.named_modules() if _is_wrapper(m)}
    live = {plain_key(k, wrappers): k for k in model.state_dict()}
    targets = model.state_dict()
    # A file's key that is not a plain name of this model is compared with every wrapper
    # segment removed on both sides, so that a real submodule called `module` survives;
    # a bare name that two of this model's keys share must match exactly instead.
    bare: dict[str, list[str]] = {}
    for plain in live:
        bare.setdefault(plain_key(plain), []).append(plain)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        candidates = [key] if key in live else bare.get(plain_key(key), [])
        if len(candidates) == 1 and live[candidates[0]] not in mapped:
            mapped[live[candidates[0]]] = value
        else:
            unexpected.append(key)
    missing = [p for p, k in live.items() if k not in mapped]
    shapes = [
        f"{plain_key(k, wrappers)} {tuple(getattr(v, 'shape', ()))} in file vs "
        f"{tuple(targets[k].shape)}"
        for k, v in mapped.items()
        if not isinstance(v, torch.Tensor) or v.shape != targets[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected {_summarise(unexpected)}")
        if shapes:
            problems.append(f"shape mismatch {_summarise(shapes, 3)}")
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}checkpoint does not fit this model ({'; '.join(problems)})")
    return mapped


# ---------------------------------------------------------------------- RNG state


def rng_state(devices: Sequence[torch.device] = ()) -> dict:
    """Every generator of this process that can change a run: Python, NumPy, torch's CPU
    generator and the CUDA generators of `devices` (the GPUs this process computes on: one
    per DDP rank). Other GPUs' generators belong to other ranks, and a node with fewer GPUs
    must still be able to resume."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in cuda]
    return state


def set_rng_state(state: dict, devices: Sequence[torch.device] = ()) -> None:
    """The inverse of `rng_state(devices)`. CUDA states saved for another number of devices
    (another kind of run) are left out: those generators keep their seeded state."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = [d for d in devices if d.type == "cuda"]
    saved = state.get("cuda")
    if cuda and isinstance(saved, list) and len(saved) == len(cuda):
        for device, generator in zip(cuda, saved, strict=True):
            torch.cuda.set_rng_state(generator, device)


# ------------------------------------------------------ the whole training state


def training_state(
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    *,
    epoch: int,
    step: int,
    step_in_epoch: int,
    world_size: int,
    args,
    devices: Sequence[torch.device] = (),
) -> dict:
    """Everything needed to continue exactly where this run is now, as this process sees
    it (`CheckpointManager.save` adds every rank's own part under `ranks`)."""
    return {
        "model": model_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch,
        "step": step,
        "step_in_epoch": step_in_epoch,
        "world_size": world_size,
        "args": dict(vars(args)),
        "rng": rng_state(devices),
    }


def _check_optimizer(saved, optimizer, source: Path) -> None:
    """The optimizer state must be for exactly these parameters, shape for shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        entries = saved["state"].items()
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{source}: optimizer state is malformed") from None
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(
            f"{source}: optimizer state is for a different set of parameters "
            f"({sum(sizes)} in the file, {len(params)} in this model)"
        )
    for index, entry in entries:
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"{source}: optimizer state names parameter {index!r}")
        for name, value in entry.items():
            shape = params[index].shape
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                raise CheckpointError(
                    f"{source}: optimizer state {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(shape)}"
                )


def restore_training_state(
    state: dict,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    source: Path,
    rank: int = 0,
    world_size: int = 1,
    devices: Sequence[torch.device] = (),
) -> dict | None:
    """Put a loaded checkpoint back into live objects, all or nothing: everything that can be
    checked is checked before the first object changes. The model comes first, so a
    checkpoint of another architecture is reported by its model keys rather than by its
    optimizer's parameter count; the RNG states are set before the model is loaded because
    setting them is what can still fail, and are put back if it does.

    Each rank takes its own entry of `ranks` (its RNG states, its local-sgd replica) when
    the checkpoint was written by as many ranks as there are now, and returns it; else the
    RNG states of the writer (rank 0) and None."""
    weights = match_model_state(model, state["model"], str(source))
    _check_optimizer(state["optimizer"], optimizer, source)
    for key in ("scheduler", "rng"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{source}: {key} state is malformed")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise CheckpointError(f"{source}: scaler state is malformed")
    ranks, mine = state.get("ranks"), None
    if ranks is not None:
        if not (
            isinstance(ranks, list)
            and len(ranks) == state["world_size"]
            and all(isinstance(r, dict) and isinstance(r.get("rng"), dict) for r in ranks)
        ):
            raise CheckpointError(f"{source}: per-rank state is malformed")
        if len(ranks) == world_size:
            mine = ranks[rank]
    before = rng_state(devices)
    try:
        set_rng_state(mine["rng"] if mine else state["rng"], devices)
    except Exception:
        set_rng_state(before, devices)
        raise CheckpointError(f"{source}: RNG state is malformed") from None
    model.load_state_dict(weights)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except Exception as e:  # unreachable for files this project writes: all checked above
        raise CheckpointError(f"{source}: could not restore the training state ({e})") from None
    return {k: v for k, v in mine.items() if k != "rng"} if mine else None
