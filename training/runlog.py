"""What a run reports: log lines, TensorBoard scalars, a progress bar and summary.json.
All of it on global rank 0 only; on other ranks every method is a no-op.

A run also starts here: `RunLog(env, out_dir, args)` chooses the intra-op threads and says so
in the run's first line, and claims --out-dir, so that two runs never mix their checkpoints,
summaries and TensorBoard event files in one folder."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from core.dist import DistEnv, choose_threads, rank0_logger
from core.errors import UsageError
from training.checkpoint.files import atomic_write
from training.guard import strict_json
from training.outdir_lock import lock_out_dir, unlock_out_dir

# What a run writes into --out-dir (train_*.py, training/checkpoint/, training/sharded.py,
# comm/tracer.py).
RUN_FILES = (
    "checkpoint.pt",
    "checkpoint.dcp",
    "checkpoints",
    "summary.json",
    "tb",
    "profile",
    "timeline",  # --trace-comm's per-rank records (comm/tracer.py)
    "timeline.json",  # and what `python -m study.timeline` made of them
    "timeline.png",
)


def previous_run(out_dir: Path) -> list[str]:
    """The names of RUN_FILES that a run has left in `out_dir`, in that order."""
    found = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name if not path.is_dir() else f"{name}/")
    return found


def check_writable(out_dir: Path) -> None:
    """Refuse an --out-dir this run could not write into (a file, a folder under a file,
    /proc, /dev/null, a read-only or full mount, missing permissions), in one line and
    before any work, without leaving a trace: the missing folders and a nameless file are
    created, then removed again. The folder itself is created by the run's first write, so
    a run refused later on (a bad checkpoint) leaves --out-dir as it found it."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        what = "it" if existing == out_dir else str(existing)
        raise UsageError(f"--out-dir {out_dir}: {what} is not a folder")
    created: list[Path] = []
    try:
        missing = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        why = e.strerror or str(e)
        raise UsageError(f"--out-dir {out_dir}: this run cannot write there ({why})") from None
    finally:
        for folder in reversed(created):
            folder.rmdir()


def claim_out_dir(out_dir: Path, resume: str | None, overwrite: bool, env: DistEnv) -> None:
    """Refuse to start a new run in a folder that holds another one, unless told to continue
    it (--resume) or to replace it (--overwrite, which deletes RUN_FILES and nothing else).
    Global rank 0 takes the folder's lock first (training/outdir_lock.py: one run at a time),
    then looks and decides; every rank gets its verdict."""
    error = None
    if env.is_main:
        check_writable(out_dir)  # a path that cannot be a folder fails now, leaving nothing
        error = lock_out_dir(out_dir)  # None, or who holds it: then nothing below happens
        used = [] if error else previous_run(out_dir)
        if overwrite and resume and not error:
            error = "--overwrite starts a new run, --resume continues one: choose one of them"
        elif used and overwrite:
            for name in used:
                path = out_dir / name.rstrip("/")
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif used and not resume:
            error = (
                f"--out-dir {out_dir} holds a previous run ({', '.join(used)}): add --resume "
                "auto to continue it, --overwrite to replace it, or choose another --out-dir"
            )
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # also: nobody goes on before the deletion
        error = box[0]
    if error:
        if env.is_main:
            unlock_out_dir(out_dir)
        raise UsageError(error)


class RunLog:
    def __init__(self, env: DistEnv, out_dir: Path, args: argparse.Namespace | None = None):
        """With the script's `args`: choose the threads (the first log line says how many)
        and claim `out_dir` (see `claim_out_dir`). Without, only report."""
        self.enabled = env.is_main
        self.out_dir = Path(out_dir)
        self.log: logging.Logger = rank0_logger(env)
        self._tb = None
        if args is not None:
            workers = getattr(args, "workers", 0)
            self.info("%s", choose_threads(env.local_world_size, workers, env.device.type))
            claim_out_dir(self.out_dir, args.resume, args.overwrite, env)

    def info(self, msg: str, *args) -> None:
        self.log.info(msg, *args)

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled or not values:
            return
        if self._tb is None:  # on first use: a run that has nothing to do leaves no event file
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)

    def progress(self, total: int, desc: str) -> tqdm:
        """A progress bar for people watching a terminal; silent in logs and CI (not a TTY).
        Log lines go through tqdm.write (core/dist.py), so they never land on the bar."""
        return tqdm(
            total=total,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            disable=not (self.enabled and sys.stderr.isatty()),
        )

    def finished(self, step: int, total_steps: int) -> dict | None:
        """The summary of the run this one resumed, when that run has already done all
        `total_steps` and written summary.json: there is nothing left to do, and the summary
        is kept as it is (a run that stopped between its last checkpoint and its summary gets
        None and goes through the loop, which writes one). Every rank gets the same answer."""
        if step < total_steps:
            return None
        path = self.out_dir / "summary.json"
        summary = None
        if self.enabled:  # rank 0 reads, as it alone writes: the others need no shared disk
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                summary = None
            if not isinstance(summary, dict) or summary.get("steps") != step:
                summary = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [summary]
            dist.broadcast_object_list(box, src=0)
            summary = box[0]
        if summary is not None:
            unlock_out_dir(self.out_dir)  # this run is over
            self.info(
                "nothing to do: %s finished at step %d of %d; %s kept as it is (raise "
                "--epochs or --max-steps to train further, or --overwrite to start over)",
                self.out_dir,
                step,
                total_steps,
                path,
            )
        return summary

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            # Strict JSON: a non-finite number (nan, inf) is written as null (strict_json).
            text = json.dumps(strict_json(summary), indent=2, sort_keys=True, allow_nan=False)
            text += "\n"
            atomic_write(self.out_dir / "summary.json", text.encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        unlock_out_dir(self.out_dir)
