"""One run per --out-dir, enforced by a lock that the kernel releases for a crashed run.

Global rank 0 takes an exclusive `flock` on `<out-dir>/.run.lock` when the run claims the
folder and holds it until the run ends. A second run on the same folder is refused at start,
in one line naming the holder, instead of the two pruning and renaming each other's
checkpoint files mid-write. A process that dies, even by SIGKILL, loses the lock with its
open file, so a crash never leaves the folder stuck; a lock file left by a killed run means
nothing when no process holds it. A run that ends, or fails, removes the lock file it created
(and the folders it created, if the run wrote nothing in them).

The case the lock is for: when a torchrun agent is SIGKILLed, its workers are re-parented
and keep training and saving. A relaunch on the same --out-dir is then refused until they
are stopped, which the refusal says.

flock works on local filesystems and on NFSv4 (Linux maps it to a POSIX lock there); on a
shared filesystem without lock support a second run is not detected.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from core.errors import undo_on_failure

LOCK_NAME = ".run.lock"


@dataclass
class _Lock:
    file: IO[str]
    made_file: bool  # the lock file did not exist before this run
    made_folders: list[Path]  # folders created for it, outermost first


# The locks this process holds, by folder. One process runs one job at a time; a test or a
# notebook that runs several in turn hands a folder's lock from the finished run to the next.
_held: dict[Path, _Lock] = {}


def lock_out_dir(out_dir: Path) -> str | None:
    """Hold `out_dir`'s lock until `unlock_out_dir` or the end of this process, and return
    None; or, if another process holds it, return the refusal naming the holder. Creates
    `out_dir` if it is missing; `unlock_out_dir` takes back what it created."""
    key = Path(out_dir).resolve()
    unlock_out_dir(key)  # an earlier run in this process is over
    missing = [p for p in (key, *key.parents) if not p.exists()][::-1]
    made: list[Path] = []
    try:
        for folder in missing:
            folder.mkdir()
            made.append(folder)
        made_file = not (key / LOCK_NAME).exists()
        f = open(key / LOCK_NAME, "a+")  # noqa: SIM115 -- held open for the whole run
    except OSError as e:  # a folder this user cannot write to
        _remove_empty(made)
        return f"--out-dir {out_dir}: cannot create its lock file {LOCK_NAME} ({e.strerror})"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        return (
            f"--out-dir {out_dir} is in use: a run holds its lock ({holder}). Wait for it to "
            "end, stop it, or choose another --out-dir; if you killed its torchrun, its workers "
            "may still be running: stop them (kill PID) before relaunching"
        )
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[key] = _Lock(f, made_file, made)
    return None


def unlock_out_dir(out_dir: Path) -> None:
    """Release `out_dir`'s lock if this process holds it, and take back what `lock_out_dir`
    created: the lock file, and the folders if the run left nothing in them (a run refused
    after the claim, e.g. for a bad checkpoint, leaves --out-dir as it found it).

    The file is unlinked while still locked: a run starting at that moment either met the
    lock (and was refused) or creates a new file of its own, which nobody else holds."""
    lock = _held.pop(Path(out_dir).resolve(), None)
    if lock is None:
        return
    if lock.made_file:
        Path(lock.file.name).unlink(missing_ok=True)
    lock.file.close()  # closing the file releases the flock
    _remove_empty(lock.made_folders)


def release_all() -> None:
    """Release every lock this process holds (its run failed: see core.errors.run_cli)."""
    for key in list(_held):
        unlock_out_dir(key)


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (outermost first) from the innermost out, stopping at the first that
    is not empty: what a run wrote stays."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


undo_on_failure(release_all)


def writer_gone(tmp: Path) -> bool:
    """Whether the temporary file `tmp`, named `...tmp-PID` by its writer, was left by a
    writer that no longer runs on this machine (or by this process, whose writes are done when
    it prunes). Pruning deletes only those: never a file another process is still writing."""
    pid = tmp.name.rpartition("tmp-")[2]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False
