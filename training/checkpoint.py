"""Checkpoints that any wrapper can load and that resume the exact same run.

The file is one dict: `model` (a plain state_dict: no `module.` or `_orig_mod.` in any key,
whatever wrapped the model when it was saved), `optimizer`, `scheduler`, `scaler`, `epoch`,
`step`, `world_size`, `args` and `rng`. It is written by global rank 0 alone, to a temporary
file in the same directory that is fsync'ed and then renamed over the old one, so a crash
never leaves a half-written checkpoint under the real name; every rank then meets at a
barrier, so nobody reads a file that is still being written.

It is loaded with `weights_only=True`: a checkpoint is untrusted input, and a full unpickler
would run whatever code the file asks for.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from comm.dist import UsageError

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


def rng_state() -> dict:
    """Every generator that can change a run: Python, NumPy, torch CPU and CUDA."""
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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ save and load


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is at every moment either the old file or the
    new one: temp file in the same directory (same filesystem, so the rename is atomic),
    fsync, rename, fsync of the directory (so the rename itself survives a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict, is_main: bool) -> None:
    """Rank 0 writes, then everyone waits at a barrier until the file is complete.

    Called on every rank: the barrier is a collective, so calling it inside
    `if rank == 0:` would deadlock the others."""
    if is_main:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(path, buf.getvalue())
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path) -> dict:
    """Read and check a checkpoint; any problem is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        # map_location="cpu": tensors saved from cuda:0 would otherwise all land on cuda:0 in
        # every rank; load_state_dict copies them to each rank's own device.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (missing {', '.join(missing)})"
        )
    return state


def param_checksum(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, in key order: equal iff bit-identical."""
    h = hashlib.sha256()
    for key, value in sorted(model_state(model).items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
) -> dict:
    """Everything needed to continue exactly where this run is now."""
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
        "rng": rng_state(),
    }


def check_same_batches(state: dict, samples_per_step: int, source: str) -> None:
    """Refuse to resume a run whose optimizer steps took other samples than this one's.

    The sampler's permutation depends only on the seed and the epoch, and each optimizer
    step takes the next `samples_per_step` indices of it, however they are split into
    ranks (DDP), replicas (DataParallel) or micro-batches (--grad-accum). So
    `train_dp.py --batch-size 32` goes on in `train_ddp.py --batch-size 16` on 2 ranks,
    and the other way round, but not with another number of samples per step.
    """
    saved = state["args"]
    theirs = saved["batch_size"] * state["world_size"] * saved["grad_accum"]
    if theirs != samples_per_step:
        raise CheckpointError(
            f"{source} was written by a run with {theirs} samples per optimizer step "
            f"({saved['batch_size']} x {state['world_size']} rank(s) x {saved['grad_accum']} "
            f"micro-batches), this run has {samples_per_step}: the data order would differ"
        )


def restore_training_state(
    state: dict, model: nn.Module, optimizer, scheduler, scaler, source: str
) -> None:
    """Put a loaded checkpoint back into live objects. The model and then the optimizer are
    checked before anything changes, so a checkpoint of another architecture is reported
    by its model keys rather than by its optimizer's parameter count."""
    weights = match_model_state(model, state["model"], source)
    saved_groups = state["optimizer"].get("param_groups", [])
    live_groups = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in live_groups]:
        raise CheckpointError(f"{source}: optimizer state is for a different set of parameters")
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
