"""How a checkpoint file is written safely and read back checked.

Global rank 0 alone writes, to a temporary file in the same directory that is fsync'ed and
then renamed into place, so a crash never leaves a half-written checkpoint under a real
name; `point` moves a symlink the same way. A checkpoint is untrusted input: it is loaded
with `weights_only=True` (a full unpickler would run whatever code the file asks for), and
each zip entry's CRC-32 is checked first, since torch.load does not.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from training.checkpoint.contents import REQUIRED, CheckpointError
from training.checkpoint.schema import check_contents
from training.faults import slow_down


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PausingFile:
    """A file that runs the test hook TRAIN_SLOW=save once, after its first bytes are on disk:
    a signal or a kill then lands in a half-written file."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._paused = False

    def write(self, data) -> int:
        n = self._file.write(data)
        if not self._paused:
            self._paused = True
            self._file.flush()
            slow_down("save")
        return n

    def flush(self) -> None:
        self._file.flush()


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write `data` to `path` so that `path` is at every moment either the old file or the
    new one: temp file in the same directory (same filesystem, so the rename is atomic),
    fsync, rename, fsync of the directory (so the rename itself survives a power cut).
    `data` is the bytes, or a function that writes them into the file it is handed (so
    that a checkpoint goes to disk without a copy of the whole file in memory first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(_PausingFile(f))
            else:
                view, half = memoryview(data), len(data) // 2  # halves without copies
                f.write(view[:half])
                slow_down("save")  # test hook (TRAIN_SLOW): a signal lands in a half-written file
                f.write(view[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write or fsync (a full disk) names no file
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_checkpoint(path: Path, state: dict) -> None:
    """torch.save straight into the temporary file, then the rename: the file appears whole
    or not at all, and memory holds no second copy of it on the way."""
    atomic_write(path, lambda f: torch.save(state, f))


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per entry, but torch.load never checks
    them: a flipped bit inside a tensor loads silently as a wrong number. zipfile does."""
    try:
        with open(path, "rb") as f:
            check_zip(f, path)
    except OSError as e:  # unreadable (permissions, an I/O error): the file may be fine
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None


def check_zip(file: IO[bytes], where: Path | str) -> None:
    """The zip archive torch.save wrote into `file` (`where` names it in a refusal): every
    entry stored uncompressed, as torch.save stores them (a compressed one could declare
    gigabytes in a small file, a zip bomb, which torch.load would allocate and inflate),
    and every entry's CRC-32 right."""
    try:
        with zipfile.ZipFile(file) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != 0]
            if packed:
                raise CheckpointError(
                    f"{where}: not a checkpoint written by torch.save (entry {packed[0]} is "
                    "compressed; torch.save stores its entries uncompressed)"
                )
            bad = archive.testzip()
    except (CheckpointError, OSError):
        raise
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{where}: not a readable checkpoint (truncated, or not written by torch.save: "
            "its zip directory is missing)"
        ) from None
    except Exception as e:  # a damaged header can fail in many ways (bad names, bad sizes)
        raise CheckpointError(
            f"{where}: not a readable checkpoint (corrupt zip structure: {type(e).__name__})"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{where}: not a readable checkpoint (corrupt: entry {bad} fails its CRC-32 check)"
        )


# Sentences of torch.load's errors that advise loosening the protection (weights_only=False,
# allow-listing the refused global) or point elsewhere: left out of the refusal, which keeps
# what the file asked for. A checkpoint of this project needs no global beyond the defaults.
_ADVICE = re.compile(
    r"weights.only|safe_globals|allowlist|trust|can still be loaded|recommended steps|"
    r"documentation|file an issue",
    re.I,
)


def load_error_reason(e: BaseException) -> str:
    """torch.load's error as one line: its reason in full (what the file asked for, e.g.
    `Trying to load unsupported GLOBAL posix.system`), without the advice to turn the
    weights-only protection off."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch bolds its advice for terminals
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    reason = " ".join(s for s in sentences if s and not _ADVICE.search(s))
    if isinstance(e, pickle.UnpicklingError):
        reason = "it holds objects that a weights-only load refuses, and nothing was run" + (
            f" ({reason})" if reason else ""
        )
    if len(reason) > 1000:  # one line, even for a message that lists a whole archive
        reason = reason[:1000].rsplit(" ", 1)[0] + " ..."
    return reason or type(e).__name__


def file_kind(path: Path) -> str:
    """What a path that is not a regular file is, in words."""
    mode = path.stat().st_mode
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def load_checkpoint(path: Path) -> dict:
    """Read and check a checkpoint; any problem is a CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        if (path / ".metadata").is_file():  # torch.distributed.checkpoint's index
            raise CheckpointError(
                f"{path}: a sharded checkpoint (training/sharded.py); resume it with the "
                "--sync mode that wrote it (zero1, zero2, zero3 or fsdp2), or convert it to "
                "one file with `python -m tools.convert`"
            )
        raise CheckpointError(f"{path}: a directory; name a checkpoint file in it")
    if not path.is_file():
        if path.exists():  # /dev/zero, a fifo: reading would never end, or block
            raise CheckpointError(f"{path}: not a regular file ({file_kind(path)})")
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    _check_archive(path)
    try:
        # map_location="cpu": tensors saved from cuda:0 would otherwise all land on cuda:0 in
        # every rank; load_state_dict copies them to each rank's own device.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not loaded: {load_error_reason(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (missing {', '.join(missing)})"
        )
    check_contents(state, path)  # every entry the resume reads: types, ranges, finite weights
    return state


def point(link: Path, target: Path) -> None:
    """Make `link` a relative symlink to `target`, atomically: a new link under a temporary
    name renamed over the old one, so readers see the old target or the new, never neither."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def pointed_to(link: Path) -> Path | None:
    """The checkpoint `link` (written by `point`) names, or None when there is no link; a
    link whose target is gone is an error, never a silent fresh start."""
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    if not target.exists():
        raise CheckpointError(f"{link}: points to {target}, which is missing")
    return target
