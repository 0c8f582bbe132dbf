"""How a run resumes: the checkpoints of one --out-dir, and which of them a run may go on from.

`CheckpointManager` keeps the newest few as `<out-dir>/checkpoints/step-XXXXXXXX.pt` and
moves the symlink `<out-dir>/checkpoint.pt` to the newest once it is whole; every rank then
meets at a barrier, so nobody reads a file that is still being written (docs/checkpoints.md).
`resume` finds the file `--resume` names, refuses one that belongs to another run
(`check_resumable`), and has every rank agree before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from core.dist import DistEnv
from parallel.base import Sync
from parallel.flags import DILOCO_EVERY, LOCAL_SGD_EVERY
from training.checkpoint.background import BackgroundWriter
from training.checkpoint.contents import CheckpointError, restore_training_state, training_state
from training.checkpoint.files import load_checkpoint, point, pointed_to, write_checkpoint
from training.checkpoint.schema import check_counters, check_position
from training.guard import check_finite
from training.outdir_lock import writer_gone

# -------------------------------------------- which checkpoint a run may continue

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
    "clip_grad_norm",
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
    if mode == "diloco":  # the outer optimizer's settings belong to the trajectory too
        return (
            f"diloco --sync-every {args.get('sync_every') or DILOCO_EVERY} --outer-lr "
            f"{args.get('outer_lr')} --outer-momentum {args.get('outer_momentum')} "
            f"--diloco-fragments {args.get('diloco_fragments')} --outer-dtype "
            f"{args.get('outer_dtype')}"
        )
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


def check_resumable(
    state: dict, args, world_size: int, source: Path, steps_per_epoch: int | None = None
) -> list[str]:
    """Refuse a checkpoint that would not continue the run these flags describe (with
    `steps_per_epoch`, also one whose counters name no place in this run); return notes on
    changes that are allowed but make the rest of the run differ from the original's (to
    float tolerance, or in its schedule)."""
    if "fault_tolerant" in state:  # its position is a cursor, not a step of this world
        raise CheckpointError(
            f"{source}: written by a --fault-tolerance job, whose steps took a number of "
            "samples that changed with its membership; resume it with --fault-tolerance"
        )
    check_counters(state, source)
    check_same_batches(state, args.batch_size * world_size * args.grad_accum, source)
    saved, live = state["args"], vars(args)
    notes = []
    if state["world_size"] != world_size:
        notes.append(
            f"{source} was written by {state['world_size']} rank(s), this job has "
            f"{world_size}: the same samples per step, so the same run to float tolerance "
            "(sums in another order), but not bit for bit"
        )
    if saved.get("topology") != live.get("topology") and state["world_size"] == world_size:
        # hsdp shards by it, the all-reduce modes reduce hierarchically by it: either way the
        # sums run in another order.
        notes.append(
            f"{source} was written with --topology {saved.get('topology')}, this job has "
            f"{live.get('topology')}: the same run to float tolerance, but not bit for bit"
        )
    check_same_flags(saved, live, source)
    if steps_per_epoch is not None:
        check_position(state, steps_per_epoch, source)
    horizon = [k for k in ("epochs", "max_steps") if k in saved and saved[k] != live.get(k)]
    if horizon and live.get("lr_schedule") == "cosine":
        flags = " and ".join("--" + k.replace("_", "-") for k in horizon)
        notes.append(
            f"{source} was written with other {flags}: the cosine schedule now ends at "
            "another step, so the learning rate from here on differs from the original run's"
        )
    return notes


def check_same_flags(
    saved: dict, live: dict, source: Path, flags: Sequence[str] = TRAJECTORY_FLAGS
) -> None:
    """Refuse a checkpoint written with other values of the flags that decide what every
    step computes (`flags`), or with another --sync mode."""
    differ = [
        f"--{k.replace('_', '-')} {saved[k]} (this run: {live[k]})"
        for k in flags
        if k in saved and k in live and saved[k] != live[k]
    ]
    if _sync_mode(saved) != _sync_mode(live):
        differ.append(f"--sync {_sync_mode(saved)} (this run: {_sync_mode(live)})")
    if differ:
        raise CheckpointError(
            f"{source}: written with {', '.join(differ)}; resume with the same flags or "
            "start a fresh --out-dir"
        )


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
        sync: Sync | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / FOLDER
        self.latest = self.out_dir / POINTER
        self.keep = keep
        self.env = env
        self.devices = list(devices) if devices is not None else [env.device]
        self.log = log or (lambda *_: None)
        # train_ddp.py's --sync strategy: with local-sgd the ranks' replicas differ between
        # two averages, so a checkpoint holds their average and each rank's own replica.
        self.sync = sync
        self.background: BackgroundWriter | None = None  # --async-save: enable_async()

    def enable_async(self) -> None:
        """--async-save: from now on rank 0 writes each checkpoint on a background thread
        from a snapshot taken at the step (background.py); `settle()` waits for it."""
        self.background = BackgroundWriter(self.env, self.log)

    def settle(self) -> None:
        """Every rank, at the end of the run or when it is preempted: wait for the save in
        flight, and raise on every rank if it failed. Nothing to wait for without
        --async-save."""
        if self.background is not None:
            self.background.settle("the end of the run")

    def abandon(self) -> None:
        """On an error path, where the peers may be gone: wait for this rank's own write (a
        file on its way to disk), without a collective; its error, if any, is dropped for
        the one that ended the run."""
        if self.background is not None:
            self.background.wait("the error exit")

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"  # zero-padded: name order is step order

    def save_training(
        self, args, model: nn.Module, optimizer, scheduler, scaler, *, epoch: int, step: int,
        step_in_epoch: int,
    ) -> Path:  # fmt: skip
        """Checkpoint the run as it is now, on every rank: the one model that every rank
        holds (the sync strategy's `consolidated()` view: training goes on unchanged) and
        this rank's own part (its `rank_state()`, taken before the views are merged)."""
        if self.background is not None:  # at most one save in flight
            self.background.settle(f"the checkpoint of step {step}")
        mine = self.sync.rank_state(optimizer) if self.sync else None
        with self.sync.consolidated(optimizer) if self.sync else nullcontext():
            state = training_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch=epoch,
                step=step,
                step_in_epoch=step_in_epoch,
                world_size=self.env.world_size,
                args=args,
                devices=self.devices,
            )
            return self.save(state, mine)

    def save(self, state: dict, rank_state: dict | None = None) -> Path:
        """Called on every rank with its own `state` (`training_state`) and `rank_state`
        (`Sync.rank_state`). Each rank's RNG states and rank state are gathered into the
        file's `ranks` list, so that every rank resumes its own generators; global rank 0
        writes, moves the pointer and deletes old files; then everyone meets at a barrier
        (collectives, so never inside `if rank == 0`), so no rank goes on while the file may
        still be incomplete.

        With --async-save (`enable_async`), rank 0 takes a snapshot of `state` here and writes
        it on the background thread, and nobody waits: the ranks meet in the next `settle()`
        instead. Call `settle()` before this when a save may be in flight."""
        # Every rank holds the same model here (the consolidated view): all refuse together.
        check_finite(state["model"], state["step"], state["args"])
        path = self.path_for(state["step"])
        mine = {"rng": state["rng"], **(rank_state or {})}
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size() if self.env.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        else:
            ranks = [mine]
        if self.env.is_main:
            state = {**state, "ranks": ranks}
            if self.background is None:
                self._write(path, state)
            else:  # the copy now, at the step; the file while training goes on
                copied = self.background.snapshot.take(state)
                self.background.start(f"step {state['step']}", lambda: self._write(path, copied))
        if dist.is_initialized() and self.background is None:
            dist.barrier()
        return path

    def _write(self, path: Path, state: dict) -> None:
        write_checkpoint(path, state)  # whole under its name, or not at all
        point(self.latest, path)  # only then the newest
        self._prune()

    def _prune(self) -> None:
        # Newest by write time, not by step: a run resumed from an older file in the same
        # --out-dir writes lower step numbers than the files of the run it abandoned.
        files = sorted(self.folder.glob("step-*.pt"), key=lambda p: (p.stat().st_mtime_ns, p))
        for old in files[: -self.keep]:
            old.unlink()
        for tmp in self.folder.glob(".step-*.pt.tmp-*"):  # left by a writer that was killed
            if writer_gone(tmp):  # never the file of a writer still at work
                tmp.unlink(missing_ok=True)

    def find(self, resume: str | None) -> Path | None:
        """The file `--resume` means: None (fresh start) for no flag, or for `auto` when
        --out-dir has no checkpoint yet; the file `checkpoint.pt` points to otherwise."""
        if not resume:
            return None
        if resume != "auto":
            return Path(resume)
        target = pointed_to(self.latest)
        if target is not None:
            return target
        return self.latest if self.latest.exists() else None

    def resume(
        self, resume: str | None, args, model: nn.Module, optimizer, scheduler, scaler,
        steps_per_epoch: int | None = None,
    ) -> Position:  # fmt: skip
        """Load, check and restore the checkpoint `--resume` names, on every rank, and hand
        the sync strategy this rank's own part (a fresh start: none, at step 0).

        The ranks agree before anything changes: if any of them cannot use the file, or they
        see different files (an --out-dir that is not shared between nodes), all of them
        raise, rather than some walking into a collective that never completes."""
        error, path, state, notes = None, None, None, []
        try:
            path = self.find(resume)
            if path is not None:
                state = load_checkpoint(path)
                notes = check_resumable(state, args, self.env.world_size, path, steps_per_epoch)
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
        position = Position()
        if path is not None:
            position = self._restore(path, state, notes, model, optimizer, scheduler, scaler)
        if self.sync:
            try:
                self.sync.load_rank_state(optimizer, position.rank_state, position.step)
            except ValueError as e:  # this rank's part of the file does not fit the run
                raise CheckpointError(f"{path}: {e}") from None
        return position

    def _restore(
        self, path: Path, state: dict, notes: list[str], model, optimizer, scheduler, scaler
    ) -> Position:
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
