"""Sharded checkpoints for the sharded --sync modes: each rank writes its own shard.

    <out-dir>/checkpoints/step-00000012.dcp/   one torch.distributed.checkpoint (DCP) folder:
        .metadata, __0_0.distcp, ...           the tensors, one file per rank, and their index
        train_state.pt                         step, epoch, args, scheduler, every rank's RNG,
                                               the parameter names, a sha256 per DCP file
    <out-dir>/checkpoint.dcp -> checkpoints/step-00000012.dcp   the newest complete one

With zero1/zero2/zero3 a rank holds 1/W of the optimizer state (and with zero3 of the
parameters): gathering all of it on rank 0 to write one file, as training/checkpoint/ does,
would need the memory that sharding saved. DCP writes every rank's slices in parallel and
records where each slice sits in the whole tensor, so a run with another world size reads the
slices it now owns from whichever files hold them (resharding). Each mode saves its own layout:

- zero1, zero2, zero3 (comm/zero*.py): each flat vector (zero3: one per unit) as a DTensor
  sharded along its only dimension (torch.chunk's split, the one comm/zero1.shard_range
  uses), parameters and per-element optimizer state alike; the buffers, replicated.
- hsdp: as zero3, on the 2-D mesh of its --topology: sharded over the ranks of a node,
  replicated across nodes (so any other --topology, of any world size, resumes it).
- torch-zero1: the model, replicated; each parameter's optimizer state from the rank that
  owns it (ZeroRedundancyOptimizer owns whole parameters).
- fsdp2, torch-hsdp: torch's own get_state_dict / set_state_dict, DTensors throughout.

The guarantees of the single-file checkpoint hold here too:

- atomic: the ranks write into `.step-N.dcp.tmp/`; rank 0 writes `train_state.pt` (with a
  sha256 of every file the ranks wrote) only after every rank has finished, then renames the
  folder and moves `checkpoint.dcp`. A save killed at any moment leaves a `.tmp` folder that
  nothing points to (deleted by the next save) and the previous checkpoint as the newest.
- refused in one line, before any live state changes: not a folder, no or a corrupt
  `train_state.pt`, a file whose sha256 differs (DCP itself has no checksums), another --sync
  mode, other trajectory flags, another number of samples per step (the checks of
  training/checkpoint/resume.py).
- resumable at another world size with the same samples per step; each rank takes its own
  RNG states when the world size is the same, else rank 0's.
- convertible to the single-file format: `python -m tools.convert` (tools/convert.py).
- read without running code (`SafeReader`): the folder is untrusted input, and the sha256
  list is written by whoever writes the folder, so it catches corruption, not tampering.
  torch's own reader unpickles `.metadata` with a full unpickler and its load planner reads
  every non-tensor item with `torch.load(weights_only=False)`; here `.metadata` goes through
  an allow-list of DCP's own classes, and each such item through `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pathlib
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from core.dist import DistEnv
from core.errors import WRITE_ERRORS, UsageError, write_error_line
from parallel.torch_twins import FSDP2Sync, TorchZero1Sync
from training.checkpoint.background import BackgroundWriter, Snapshot, yield_to_training
from training.checkpoint.contents import CheckpointError, rng_state, set_rng_state, unwrap
from training.checkpoint.files import (
    _check_archive,
    _fsync_dir,
    check_zip,
    file_kind,
    load_error_reason,
    point,
    pointed_to,
    write_checkpoint,
)
from training.checkpoint.resume import Position, check_resumable
from training.faults import slow_down
from training.guard import Diverged, advice
from training.preempt import job_timeout

POINTER = "checkpoint.dcp"
FOLDER = "checkpoints"
STATE = "train_state.pt"
REQUIRED = ("format", "epoch", "step", "step_in_epoch", "world_size", "args", "scheduler")
REQUIRED += ("param_group", "layout", "rng", "ranks", "files")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What DCP's `.metadata` pickles (found by listing the globals of the metadata that every
# sharded mode writes, on torch 2.11 .. 2.14): its own dataclasses, torch.Size, the dtypes,
# a layout by name and the checkpoint id as a path. Nothing else is admitted.
_DCP_CLASSES = (
    dcp_metadata.Metadata,
    dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta,
    dcp_metadata.TensorProperties,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata,
    dcp_metadata._MEM_FORMAT_ENCODING,
    _StorageInfo,
    torch.Size,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
)
_ALLOWED = {(c.__module__, c.__qualname__): c for c in _DCP_CLASSES}
_ALLOWED["torch.serialization", "_get_layout"] = torch.serialization._get_layout
_ALLOWED.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP's metadata and nothing else: any other global (a
    function to call, a class to build) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for the global {module}.{name}") from None


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader for a folder `load_sharded_state` has checked, that runs no code from
    it and allocates nothing the folder's files cannot hold: `.metadata` through the
    allow-list above, checked (`_check_metadata`) against the files `signed` lists; every
    non-tensor item through `torch.load(weights_only=True)` (the tensors torch's reader
    already loads so)."""

    def __init__(self, path: Path, signed: dict) -> None:
        super().__init__(path)
        self.folder = Path(path)
        self.signed = signed

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        file = self.folder / ".metadata"
        try:
            with open(file, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - whatever a hostile pickle raises: refused
            raise CheckpointError(
                f"{file}: not DCP metadata, refused and nothing was run ({_reason(e)})"
            ) from None
        _check_metadata(metadata, self.folder, self.signed)
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self.folder))

    def _slice_file(self, file, sinfo: _StorageInfo) -> IO[bytes]:
        """Each item is a torch.save archive: its CRC-32s checked (torch.load does not), so
        a corrupt item is refused, re-signed or not, rather than read as wrong numbers."""
        file.seek(sinfo.offset)
        item = io.BytesIO(file.read(sinfo.length))
        check_zip(item, f"{self.folder / sinfo.relative_path} (item at byte {sinfo.offset})")
        item.seek(0)
        return item


class _WeightsOnlyBytes:
    """`planner` with its non-tensor items loaded by `weights_only=True` first: the planner's
    own `torch.load(weights_only=False)` then reads only the re-serialised result, which
    holds nothing but what the weights-only unpickler admits (containers, numbers, strings,
    tensors)."""

    def __init__(self, planner, folder: Path) -> None:
        self._planner = planner
        self._folder = folder

    def __getattr__(self, name: str):
        return getattr(self._planner, name)

    def load_bytes(self, item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - refused, whatever the file holds
            raise CheckpointError(
                f"{self._folder}: item {item.storage_index.fqn} not loaded: {load_error_reason(e)}"
            ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(item, clean)


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _check_metadata(metadata, folder: Path, signed: dict) -> None:
    """The unpickled metadata has DCP's shape, names only signed files of its folder at
    offsets inside them, and declares no more tensor bytes than those files hold (a reader
    allocates what it declares)."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{folder / '.metadata'}: malformed DCP metadata ({what})")

    def sizes(value) -> bool:
        return isinstance(value, torch.Size) and all(type(n) is int and n >= 0 for n in value)

    if not isinstance(metadata, dcp_metadata.Metadata):
        raise bad(f"a {type(metadata).__name__}")
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(
        metadata.storage_data, dict
    ):
        raise bad("its index is not a dict")
    # planner_data: where each flat key sits in the nested dict (a path of keys and list
    # indices), which DCP's loaders rebuild, padding a list up to each index: a list index
    # can be no larger than the number of entries the metadata lists.
    entries = len(metadata.state_dict_metadata)
    paths = metadata.planner_data
    if paths is not None and not (
        isinstance(paths, dict)
        and all(
            isinstance(path, (list, tuple))
            and all(type(k) is str or (type(k) is int and 0 <= k < entries) for k in path)
            for path in paths.values()
        )
    ):
        raise bad("planner data")
    data_files = {n for n in signed if n not in (".metadata", STATE)}
    held = sum((folder / n).stat().st_size for n in data_files)
    declared = 0
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, dcp_metadata.BytesStorageMetadata):
            continue
        if not (
            isinstance(md, dcp_metadata.TensorStorageMetadata)
            and sizes(md.size)
            and isinstance(md.properties, dcp_metadata.TensorProperties)
            and isinstance(md.properties.dtype, torch.dtype)
            and isinstance(md.chunks, list)
            and all(
                isinstance(c, dcp_metadata.ChunkStorageMetadata)
                and sizes(c.offsets)
                and sizes(c.sizes)
                and len(c.offsets) == len(c.sizes) == len(md.size)
                and all(o + n <= s for o, n, s in zip(c.offsets, c.sizes, md.size, strict=True))
                for c in md.chunks
            )
        ):
            raise bad(f"entry {fqn!r}")
        declared += math.prod(md.size) * md.properties.dtype.itemsize
    if declared > held:
        raise bad(f"it declares {declared} bytes of tensors, its files hold {held}")
    for index, info in metadata.storage_data.items():
        if not (
            isinstance(index, dcp_metadata.MetadataIndex)
            and isinstance(info, _StorageInfo)
            and info.relative_path in data_files
            and type(info.offset) is int
            and type(info.length) is int
            and info.offset >= 0
            and info.length >= 0
            and info.offset + info.length <= (folder / info.relative_path).stat().st_size
            and not info.transform_descriptors
        ):
            raise bad(f"storage of {getattr(index, 'fqn', index)!r}")


def layout(model: nn.Module) -> dict:
    """The model's parameter names and shapes in order, and the units of parallel/zero3.py (each
    module that owns parameters): what tools/convert.py needs to cut flat vectors back
    into named tensors, without building the model."""
    params = [[name, list(p.shape)] for name, p in model.named_parameters()]
    units = [
        [f"{prefix}.{n}" if prefix else n for n, p in m.named_parameters(recurse=False)]
        for prefix, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    return {"params": params, "units": units}


def _state_of(optimizer, param: torch.Tensor, prefix: str, metadata) -> dict:
    """The optimizer's state for `param`. Before the first step (a resume) it does not exist
    yet: create it, zeros of the shapes the checkpoint lists, for dcp.load to fill."""
    state = optimizer.state[param]
    if not state and metadata is not None:
        for key, meta in metadata.state_dict_metadata.items():
            if key.startswith(prefix + ".") and key.count(".") == prefix.count(".") + 1:
                name = key[len(prefix) + 1 :]
                if name == "params":
                    continue
                dtype = meta.properties.dtype
                state[name] = (
                    torch.zeros((), dtype=dtype)
                    if len(meta.size) == 0
                    else torch.zeros_like(param.detach(), dtype=dtype)
                )
    return state


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer for --async-save, with its staging (the copy to CPU memory that
    `dcp.async_save` makes on the training thread) done by background.Snapshot: DCP's own
    deep-copies each DTensor, which fails for a shard that is a view of a larger buffer (as
    the zero modes' are). With the test hook TRAIN_SLOW=save:S (training/faults.py) before
    each rank writes its files, so that a test can kill a rank, or change the live tensors,
    while the save is in flight."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.snapshot = Snapshot(whole_storages=False)  # buffers kept from save to save

    def stage(self, state_dict: dict) -> dict:
        self.per_thread_copy_ahead = 0  # as DCP's own stage(): the data is in CPU memory
        return self.snapshot.take(state_dict)

    def write_data(self, plan, planner):
        yield_to_training()  # DCP's thread, one per save
        self.snapshot.ready()  # the copies from GPUs have landed
        slow_down("save")
        return super().write_data(plan, planner)


class ShardedCheckpoints:
    """The sharded checkpoints of one --out-dir, for a sharded `sync` (see the module doc)."""

    def __init__(
        self,
        out_dir: Path,
        keep: int,
        env: DistEnv,
        sync,
        log: Callable[..., None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / FOLDER
        self.latest = self.out_dir / POINTER
        self.keep = keep
        self.env = env
        self.sync = sync
        self.log = log or (lambda *_: None)
        self._mesh = None
        self.background: BackgroundWriter | None = None  # --async-save: enable_async()
        self._group = None
        self._writer: dcp.FileSystemWriter | None = None

    def enable_async(self) -> None:
        """--async-save, on every rank (it makes a process group): from now on each save
        goes through `dcp.async_save`, and rank 0 finishes the folder (train_state.pt, the
        rename, the pointer) on a background thread once every rank's files are written."""
        self.background = BackgroundWriter(self.env, self.log)
        # DCP's thread runs collectives; gloo, since async_save needs a CPU backend, and
        # bounded like the job's group (a gloo group waits 30 minutes by default).
        self._group = dist.new_group(backend="gloo", timeout=job_timeout(self.env))
        # One writer for every save, which keeps its (pinned, with GPUs) staging buffers from
        # one save to the next: safe, since the next save waits for this one to finish.
        self._writer = _Writer(self.out_dir)

    def settle(self) -> None:
        """Every rank: wait for the save in flight; see CheckpointManager.settle."""
        if self.background is not None:
            self.background.settle("the end of the run")

    def abandon(self) -> None:
        """On an error path nothing is awaited: DCP's thread needs every peer, which may be
        gone. The temporary folder it leaves is never the newest checkpoint."""

    # ---- what DCP saves and loads: views of the live tensors, so a load writes into them

    def _flat(self, local: torch.Tensor, numel: int) -> DTensor:
        # hsdp: its slices are sharded over each node and replicated across nodes; DCP saves
        # one copy of each and any layout reads back the slices it owns now.
        shape = getattr(self.sync, "mesh_shape", (self.env.world_size,))
        if self._mesh is None:
            self._mesh = init_device_mesh(self.env.device.type, shape)
        placements = [Replicate()] * (len(shape) - 1) + [Shard(0)]
        return DTensor.from_local(
            local, self._mesh, placements, run_check=False, shape=torch.Size([numel]), stride=(1,)
        )

    def tensors(self, optimizer, metadata=None) -> dict:
        sync = self.sync
        if isinstance(sync, FSDP2Sync):
            model_sd, optim_sd = get_state_dict(sync.model, optimizer)
            return {"model": model_sd, "optim": optim_sd}
        if isinstance(sync, TorchZero1Sync):
            module = sync.model.module
            names = {p: n for n, p in module.named_parameters()}
            inner = optimizer.optim  # the local optimizer: only the parameters this rank owns
            optim = {
                names[p]: _state_of(inner, p, f"optim.{names[p]}", metadata)
                for group in inner.param_groups
                for p in group["params"]
            }
            return {"model": module.state_dict(), "optim": optim}
        flat = {}
        for name, (shard, numel) in sync.flat_shards().items():
            state = _state_of(optimizer, shard, f"flat.{name}", metadata)
            entry = {"params": self._flat(shard.data, numel)}
            for key, value in state.items():
                entry[key] = self._flat(value, numel) if value.dim() else value
            flat[name] = entry
        return {"flat": flat, "buffers": dict(sync.model.named_buffers())}

    # ---- save

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.dcp"

    def save_training(
        self, args, model: nn.Module, optimizer, scheduler, scaler, *, epoch: int, step: int,
        step_in_epoch: int,
    ) -> Path:  # fmt: skip
        """Called on every rank: each writes its shard, rank 0 the rest; see the module doc.
        CheckpointManager.save_training's call, so that train_ddp.py saves alike in every
        mode: `model` is the sync's (which this class holds), and check_supported() leaves no
        GradScaler state to keep."""
        if self.background is not None:  # at most one save in flight
            self.background.settle(f"the checkpoint of step {step}")
        tensors = self.tensors(optimizer)
        # Each rank holds other shards: one small all-reduce, so that all refuse together.
        bad = torch.tensor([0 if _all_finite(tensors) else 1], device=self.env.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise Diverged(
                f"training diverged: the weights or optimizer state are not finite after step "
                f"{step}; {advice(args)} and start again (no checkpoint with non-finite "
                "weights was written)"
            )
        final = self.path_for(step)
        tmp = final.with_name(f".{final.name}.tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if self.background is None:
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))
        else:
            # DCP copies this rank's shards to CPU memory now (its staging) and writes them on
            # its own thread, whose collectives (the plan, the metadata) run in the gloo group
            # made for them, never beside the training's in the same group.
            written = dcp.async_save(
                tensors, checkpoint_id=tmp, storage_writer=self._writer, process_group=self._group
            )
            # torch 2.11 .. 2.14 return a Future here (FileSystemWriter stages in the call);
            # a stager that stages in the background would return an AsyncSaveResponse.
            written = getattr(written, "upload_completion", written)
        mine = {"rng": rng_state([self.env.device]), **self.sync.rank_state(optimizer)}
        ranks = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(mine, ranks, dst=0)
        state = None
        if self.env.is_main:
            # The hyper-parameters (lr, betas, ...), for tools/convert.py.
            group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            state = {
                "format": "sharded",
                "epoch": epoch,
                "step": step,
                "step_in_epoch": step_in_epoch,
                "world_size": self.env.world_size,
                "args": dict(vars(args)),
                "scheduler": scheduler.state_dict(),
                "param_group": group,
                "layout": layout(unwrap(self.sync.model)),
                "rng": ranks[0]["rng"],
                "ranks": ranks,
            }
        if self.background is None:
            if state is not None:
                self._finish(tmp, final, state)
            dist.barrier()
        else:
            copied = self.background.snapshot.take(state)

            def finish() -> None:
                try:  # rank 0's: done once every rank's files are (DCP's finish step)
                    written.result()
                except (Exception, CheckpointException) as e:  # one line, naming the rank
                    raise _write_error(e) from None
                if copied is not None:
                    self._finish(tmp, final, copied)

            self.background.start(f"step {step}", finish)
        return final

    def _finish(self, tmp: Path, final: Path, state: dict) -> None:
        """Rank 0, once every rank has written its files into `tmp`: the train state with the
        files' sha256, the rename, the pointer."""
        # Written last, over every file the ranks wrote: DCP has no checksums.
        state = {**state, "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())}}
        write_checkpoint(tmp / STATE, state)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        point(self.latest, final)
        self._prune()

    def _prune(self) -> None:
        done = sorted(self.folder.glob("step-*.dcp"), key=lambda p: (p.stat().st_mtime_ns, p))
        for old in done[: -self.keep]:
            shutil.rmtree(old)
        for tmp in self.folder.glob(".step-*.dcp.*"):  # left by a save that was killed
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- resume

    def find(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        return pointed_to(self.latest)

    def resume(
        self, resume: str | None, args, model, optimizer, scheduler, scaler,
        steps_per_epoch: int | None = None,
    ) -> Position:  # fmt: skip
        """Check, agree, then load into the live objects; the same contract as
        training/checkpoint/resume.py's CheckpointManager.resume (`model` is the sync's).
        Refuses first what a sharded checkpoint cannot hold (check_supported)."""
        check_supported(args)
        error, path, state, notes = None, None, None, []
        try:
            path = self.find(resume)
            if path is not None:
                state = load_sharded_state(path)
                notes = check_resumable(state, args, self.env.world_size, path, steps_per_epoch)
                reader = SafeReader(path, state["files"])
                metadata = reader.read_metadata()
                live = {k for k in optimizer.param_groups[0] if k != "params"}
                saved = state["param_group"]
                if not isinstance(saved, dict) or set(saved) != live:
                    raise CheckpointError(f"{path}: optimizer settings do not fit this optimizer")
        except CheckpointError as e:
            error = str(e)
        views: list = [None] * self.env.world_size
        dist.all_gather_object(views, (error, str(path) if path else None))
        failed = [(r, e) for r, (e, _) in enumerate(views) if e is not None]
        if failed and error is None:
            error = "rank {} cannot resume: {}".format(*failed[0])
        elif error is None and len({p for _, p in views}) > 1:
            error = "the ranks see different checkpoints; is --out-dir shared?"
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            return Position()
        try:
            tensors = self.tensors(optimizer, metadata)
            dcp.load(tensors, storage_reader=reader)
        # Every rank gets DCP's error (a CheckpointException is no Exception): all stop here.
        except (Exception, CheckpointException) as e:
            raise dcp_error(e, f"{path}: does not fit this run") from None
        if isinstance(self.sync, FSDP2Sync):
            set_state_dict(
                self.sync.model,
                optimizer,
                model_state_dict=tensors["model"],
                optim_state_dict=tensors["optim"],
            )
        else:
            # What optimizer.load_state_dict would restore besides the state: the learning
            # rate the schedule had reached (and the other hyper-parameters).
            for group in optimizer.param_groups:
                group.update(state["param_group"])
            if not isinstance(self.sync, TorchZero1Sync):
                self.sync.after_load()
        scheduler.load_state_dict(state["scheduler"])
        ranks = state["ranks"]
        mine = ranks[self.env.rank] if len(ranks) == self.env.world_size else ranks[0]
        set_rng_state(mine["rng"], [self.env.device])
        # This rank's own part, written by as many ranks as there are now (torch-zero1:
        # DDP's gradient-ready order, parallel/ddp.py).
        own = {k: v for k, v in mine.items() if k != "rng"}
        try:
            same = len(ranks) == self.env.world_size
            self.sync.load_rank_state(optimizer, own if same else None, state["step"])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        for note in notes:
            self.log("note: %s", note)
        self.log("resumed from %s at step %d (epoch %d)", path, state["step"], state["epoch"])
        return Position(state["step"], state["epoch"], state["step_in_epoch"])


def _write_error(e: BaseException) -> CheckpointError:
    """One line for an error out of an async DCP save: DCP hands every rank the failing
    rank's exception, wrapped."""
    rank, failure = next(iter(getattr(e, "failures", {}).items()), (None, (e,)))
    inner = failure[0]
    where = f"rank {rank}'s files: " if rank is not None else ""
    if isinstance(inner, OSError) and inner.errno in WRITE_ERRORS:
        return CheckpointError(where + write_error_line(inner))
    return CheckpointError(where + _reason(inner))


def dcp_error(e: BaseException, context: str) -> CheckpointError:
    """One line for an error out of dcp.load: our own refusal as it is (DCP wraps each rank's
    exception in a CheckpointException), anything else after `context`."""
    if isinstance(e, CheckpointException):  # {rank: (exception, its stack)}
        e = next(iter(e.failures.values()), (e,))[0]
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, pickle.UnpicklingError):  # a tensor item torch's reader refused
        return CheckpointError(f"{context}: {load_error_reason(e)}")
    return CheckpointError(f"{context} ({_reason(e)})")


def _all_finite(tree) -> bool:
    """No nan or inf in the floating-point tensors of a nested dict (this rank's shards)."""
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if isinstance(tree, DTensor) else tree
        return not local.is_floating_point() or bool(torch.isfinite(local).all())
    return True


def load_sharded_state(path: Path) -> dict:
    """Read and check a sharded checkpoint's train_state.pt and the files it lists."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(
            f"{path}: a single-file checkpoint; the sharded --sync modes resume from a "
            "checkpoint folder (step-N.dcp; tools/convert.py goes the other way)"
        )
    if not path.is_dir():
        if path.exists():
            raise CheckpointError(f"{path}: not a checkpoint folder ({file_kind(path)})")
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a sharded checkpoint of this project (no {STATE})")
    file = path / STATE
    _check_archive(file)  # torch.load does not check the zip's CRC-32s
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: not loaded: {load_error_reason(e)}") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing or state["format"] != "sharded" or not isinstance(state["files"], dict):
        raise CheckpointError(f"{path}: not a sharded checkpoint of this project")
    files = state["files"]
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{path}: {STATE} names a file outside its folder")
        file = path / name
        if not file.is_file():
            what = f"not a regular file ({file_kind(file)})" if file.exists() else "missing"
            raise CheckpointError(f"{path}: {name} is {what}")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (its sha256 differs)")
    ranks = state.get("ranks")
    if not (
        isinstance(ranks, list)
        and len(ranks) == state["world_size"]
        and all(isinstance(r, dict) and isinstance(r.get("rng"), dict) for r in ranks)
    ):
        raise CheckpointError(f"{path}: per-rank state is malformed")
    return state


def check_supported(args) -> None:
    """What the sharded checkpoints do not hold: a GradScaler's state."""
    if args.amp == "fp16":
        raise UsageError(f"--amp fp16 is not supported with --sync {args.sync}")
