"""Checkpoints that any wrapper can load and that resume the exact same run.

The file is one dict: `model` (a plain state_dict: no `module.` or `_orig_mod.` in any key,
whatever wrapped the model when it was saved), `optimizer`, `scheduler`, `scaler`, `epoch`,
`step`, `step_in_epoch`, `world_size`, `args` and `rng`. Global rank 0 alone writes it, to
a temporary file in the same directory that is fsync'ed and then renamed into place, so a
crash never leaves a half-written checkpoint under a real name; every rank then meets at a
barrier, so nobody reads a file that is still being written. `CheckpointManager` keeps the
newest few as `<out-dir>/checkpoints/step-XXXXXXXX.pt` and moves the symlink
`<out-dir>/checkpoint.pt` to the newest once it is whole (docs/checkpoints.md).

It is loaded with `weights_only=True`: a checkpoint is untrusted input, and a full unpickler
would run whatever code the file asks for. Each zip entry's CRC-32 is checked first, since
torch.load does not, and nothing is restored until the whole file has been checked.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from comm.dist import DistEnv, UsageError
from comm.sync import LOCAL_SGD_EVERY

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


# ------------------------------------------------------------------ save and load


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(path.parent)


def write_checkpoint(path: Path, state: dict) -> None:
    """Serialise in memory, then write atomically: the file appears whole or not at all."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per entry, but torch.load never checks
    them: a flipped bit inside a tensor loads silently as a wrong number. zipfile does."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not written by torch.save: "
            "its zip directory is missing)"
        ) from None
    except Exception as e:  # a damaged header can fail in many ways (bad names, bad sizes)
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt zip structure: {type(e).__name__})"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (corrupt: entry {bad} fails its CRC-32 check)"
        )


def load_checkpoint(path: Path) -> dict:
    """Read and check a checkpoint; any problem is a CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory; name a checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    _check_archive(path)
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
        # A copy: .numpy() would pin the tensor's storage to its size for good, and
        # comm/zero3.py frees parameter storage by resizing it to 0 bytes between uses.
        flat = value.detach().cpu().reshape(-1).clone()
        h.update(flat.view(torch.uint8).numpy().tobytes())
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


# Flags that decide what every step computes. A checkpoint written with other values belongs
# to another run: continuing it would silently mix two trajectories. The batch is checked as
# samples per optimizer step (check_same_batches), the gradient sync by `_sync_mode`;
# everything else (paths, logging, --workers, --timeout, --epochs / --max-steps) may change
# between restarts.
TRAJECTORY_FLAGS = (
    "dataset",
    "train_size",
    "augment",
    "model",
    "lr",
    "optimizer",
    "momentum",
    "betas",
    "eps",
    "weight_decay",
    "lr_schedule",
    "warmup_steps",
    "amp",
    "dtype",
    "seed",
    "sync_bn",
)


def _sync_mode(args: dict) -> str:
    """The --sync mode with its K, as one value to compare. train_dp.py has no --sync: it
    averages the gradients every step, as ddp does. local-sgd without --sync-every is K=4."""
    mode = args.get("sync") or "ddp"
    if mode == "local-sgd":
        return f"local-sgd --sync-every {args.get('sync_every') or LOCAL_SGD_EVERY}"
    return mode


def check_same_batches(state: dict, samples_per_step: int, source: Path) -> None:
    """Refuse a checkpoint whose optimizer steps took another number of samples.

    Each step takes the next `samples_per_step` indices of the epoch's permutation (which
    depends on seed and epoch only), however they are split into ranks, DataParallel
    replicas or --grad-accum micro-batches. So the world size may change between restarts
    as long as this product stays the same; another product would draw other batches."""
    saved = state["args"]
    theirs = saved["batch_size"] * state["world_size"] * saved["grad_accum"]
    if theirs != samples_per_step:
        raise CheckpointError(
            f"{source}: written by a run with {theirs} samples per optimizer step "
            f"({saved['batch_size']} x {state['world_size']} rank(s) x {saved['grad_accum']} "
            f"micro-batches), this run has {samples_per_step}: the data order would differ"
        )


def check_resumable(state: dict, args, world_size: int, source: Path) -> list[str]:
    """Refuse a checkpoint that would not continue the run these flags describe; return
    notes on changes that are allowed but make the rest of the run differ from the
    original's (to float tolerance, or in its schedule)."""
    check_same_batches(state, args.batch_size * world_size * args.grad_accum, source)
    saved, live = state["args"], vars(args)
    notes = []
    if state["world_size"] != world_size:
        notes.append(
            f"{source} was written by {state['world_size']} rank(s), this job has "
            f"{world_size}: the same samples per step, so the same run to float tolerance "
            "(sums in another order), but not bit for bit"
        )
    differ = [
        f"--{k.replace('_', '-')} {saved[k]} (this run: {live[k]})"
        for k in TRAJECTORY_FLAGS
        if k in saved and k in live and saved[k] != live[k]
    ]
    if _sync_mode(saved) != _sync_mode(live):
        differ.append(f"--sync {_sync_mode(saved)} (this run: {_sync_mode(live)})")
    if differ:
        raise CheckpointError(
            f"{source}: written with {', '.join(differ)}; resume with the same flags or "
            "start a fresh --out-dir"
        )
    horizon = [k for k in ("epochs", "max_steps") if k in saved and saved[k] != live.get(k)]
    if horizon and live.get("lr_schedule") == "cosine":
        flags = " and ".join("--" + k.replace("_", "-") for k in horizon)
        notes.append(
            f"{source} was written with other {flags}: the cosine schedule now ends at "
            "another step, so the learning rate from here on differs from the original run's"
        )
    return notes


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
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
    except Exception as e:  # unreachable for files this project writes: all checked above
        raise CheckpointError(f"{source}: could not restore the training state ({e})") from None
    return {k: v for k, v in mine.items() if k != "rng"} if mine else None


# ------------------------------------------------------- rotation and resume

POINTER = "checkpoint.pt"  # <out-dir>/checkpoint.pt -> checkpoints/step-XXXXXXXX.pt
FOLDER = "checkpoints"


@dataclass(frozen=True)
class Position:
    """Where training starts: all zero for a fresh run, else the checkpoint's counters."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    rank_state: dict | None = None  # this rank's own part of the checkpoint (Sync.rank_state)


def point(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, atomically: a new link under a temporary
    name renamed over the old one, so readers see the old target or the new, never neither."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


class CheckpointManager:
    """The checkpoints of one --out-dir: `checkpoints/step-XXXXXXXX.pt`, the newest `keep` of
    them kept, and `checkpoint.pt`, a symlink to the newest, moved only once that file is
    complete on disk. A crash at any moment leaves `checkpoint.pt` naming a whole file."""

    def __init__(
        self,
        out_dir: Path,
        keep: int,
        env: DistEnv,
        log: Callable[..., None] | None = None,
        devices: Sequence[torch.device] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / FOLDER
        self.latest = self.out_dir / POINTER
        self.keep = keep
        self.env = env
        self.devices = list(devices) if devices is not None else [env.device]
        self.log = log or (lambda *_: None)

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"  # zero-padded: name order is step order

    def save(self, state: dict, rank_state: dict | None = None) -> Path:
        """Called on every rank with its own `state` (`training_state`) and `rank_state`
        (`Sync.rank_state`). Each rank's RNG states and rank state are gathered into the
        file's `ranks` list, so that every rank resumes its own generators; global rank 0
        writes, moves the pointer and deletes old files; then everyone meets at a barrier
        (collectives, so never inside `if rank == 0`), so no rank goes on while the file may
        still be incomplete."""
        path = self.path_for(state["step"])
        mine = {"rng": state["rng"], **(rank_state or {})}
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size() if self.env.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        else:
            ranks = [mine]
        if self.env.is_main:
            state = {**state, "ranks": ranks}
            write_checkpoint(path, state)
            point(self.latest, path)
            self._prune()
        if dist.is_initialized():
            dist.barrier()
        return path

    def _prune(self) -> None:
        # Newest by write time, not by step: a run resumed from an older file in the same
        # --out-dir writes lower step numbers than the files of the run it abandoned.
        files = sorted(self.folder.glob("step-*.pt"), key=lambda p: (p.stat().st_mtime_ns, p))
        for old in files[: -self.keep]:
            old.unlink()
        for tmp in self.folder.glob(".step-*.pt.tmp-*"):  # left by a writer that was killed
            tmp.unlink(missing_ok=True)

    def find(self, resume: str | None) -> Path | None:
        """The file `--resume` means: None (fresh start) for no flag, or for `auto` when
        --out-dir has no checkpoint yet; the file `checkpoint.pt` points to otherwise."""
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        if self.latest.is_symlink():
            target = self.latest.parent / os.readlink(self.latest)
            if not target.exists():
                raise CheckpointError(f"{self.latest}: points to {target}, which is missing")
            return target
        return self.latest if self.latest.exists() else None

    def resume(
        self, resume: str | None, args, model: nn.Module, optimizer, scheduler, scaler
    ) -> Position:
        """Load, check and restore the checkpoint `--resume` names, on every rank.

        The ranks agree before anything changes: if any of them cannot use the file, or they
        see different files (an --out-dir that is not shared between nodes), all of them
        raise, rather than some walking into a collective that never completes."""
        error, path, state, notes = None, None, None, []
        try:
            path = self.find(resume)
            if path is not None:
                state = load_checkpoint(path)
                notes = check_resumable(state, args, self.env.world_size, path)
        except CheckpointError as e:
            error = str(e)
        if dist.is_initialized() and dist.get_world_size() > 1:
            views: list[tuple | None] = [None] * dist.get_world_size()
            dist.all_gather_object(views, (error, str(path) if path else None))
            failed = [(r, e) for r, (e, _) in enumerate(views) if e is not None]
            if failed and error is None:
                error = "rank {} cannot resume: {}".format(*failed[0])
            elif error is None and len({p for _, p in views}) > 1:
                seen = ", ".join(f"rank {r}: {p or 'none'}" for r, (_, p) in enumerate(views))
                error = f"the ranks see different checkpoints ({seen}); is --out-dir shared?"
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            return Position()
        mine = restore_training_state(
            state,
            model,
            optimizer,
            scheduler,
            scaler,
            path,
            self.env.rank,
            self.env.world_size,
            self.devices,
        )
        for note in notes:
            self.log("note: %s", note)
        position = Position(state["step"], state["epoch"], state["step_in_epoch"], mine)
        self.log("resumed from %s at step %d (epoch %d)", path, position.step, position.epoch)
        return position
