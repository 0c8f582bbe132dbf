"""One-line errors and exit statuses for every entry point of the repository.

A `UsageError` (bad flags, missing data, a file that does not fit) becomes one `error: ...`
line on stderr and exit status 2 (`run_cli`); a crash keeps its traceback, written where
torchrun's report finds it (torchelastic's `record`); a process that leaves a process group
alive after an error ends without the interpreter's teardown (`exit_on_error`, `run_cli`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

# torch is imported where a run needs it (the group, torchelastic's `record`), not here: the
# flags are parsed, and a usage error reported, before anything imports torch (core/cli.py,
# training/cli.py), which takes seconds.

# True once `exit_on_error` has left a group alive after an error (see there): from then on
# the process must end without the interpreter's teardown (see `run_cli`).
_group_left_alive = False

# What a run claimed before it failed and must give back (training/outdir_lock.py: the
# --out-dir lock, and the folder it created): run_cli calls these when main() raises.
_undo: list[Callable[[], None]] = []


def undo_on_failure(undo: Callable[[], None]) -> None:
    """Have `run_cli` call `undo()` whenever the entry point ends with an exception."""
    if undo not in _undo:
        _undo.append(undo)


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with a non-zero exit.

    Most input is the same on every rank (flags, files), so global rank 0 alone reports it;
    `every_rank=True` marks input that is this process's own (its RANK, its environment),
    which each rank that has it reports itself."""

    def __init__(self, message: str, *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


# OSErrors that say where a file could not be written and why (a full disk, a read-only
# mount, a missing permission): the user's to fix, so one line naming the path, not a crash.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def write_error_line(e: OSError) -> str:
    """One line for an OSError of WRITE_ERRORS, with the path it happened at."""
    where = f"{e.filename}: " if e.filename else ""
    line = f"cannot write {where}{e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        line += " (free some space or choose another --out-dir; a restart fails the same way)"
    return line


@contextmanager
def exit_on_error(env) -> Iterator[None]:
    """Around the work of a process group this process created: an error leaves the group
    alone. Peers may still sit inside a collective with this rank, and on NCCL destroying the
    group can then block until the timeout and hide the real error; the process exits and
    torchrun's report names the rank that failed. A world of one has no peers, and must not
    leave a group behind for the next caller in the same process (a notebook, a test)."""
    global _group_left_alive
    import torch.distributed as dist  # see the imports at the top

    try:
        yield
    except BaseException:
        if env.world_size == 1:
            dist.destroy_process_group()
        else:
            _group_left_alive = True  # run_cli ends the process without the teardown
        raise


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone: later writes (and the flush at
    exit) would raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Call `main(argv)` as a script's entry point; return the exit status: what main returned
    if that is an int (a tool's own status), else 0.

    A UsageError becomes one `error: ...` line on stderr and exit status 2. Usage errors are
    the same on every rank (same flags, same files), so only global rank 0 prints the line;
    the others exit with the same status silently (unless the error is the rank's own:
    `UsageError.every_rank`). A file that cannot be written (a full disk: WRITE_ERRORS) is
    one line naming the path on the rank that met it, and exit status 1.

    Any other exception propagates through torchelastic's `record`, applied here *outside*
    the UsageError handler (entry points must not carry `@record` themselves): a crash writes
    its traceback to torchrun's error file, so torchrun's report names the failing rank and
    shows the traceback, while a usage error never reaches `record` and leaves no traceback
    anywhere. For a usage error, every rank writes the error line itself as its error file, so
    torchrun's report shows that line whichever rank it names as the root cause (the first
    to exit).

    After an error that left a process group alive (`exit_on_error` does not destroy it),
    the process ends here, through `os._exit`, once the error is reported and the output
    flushed. The group's native threads (gloo's pt_gloo_runloop and gloo_tcp_loop, NCCL's
    watchdog) are still running, and the interpreter's teardown is not safe beside them: a
    C++ thread that needs the GIL while Python finalizes (to free a tensor or run a future's
    callback) is ended with pthread_exit in the middle of C++ code, which aborts the process
    ("terminate called without an active exception", SIGABRT) and replaces the exit status
    the error deserved. Ending without the teardown keeps the status and the one-line error.
    """

    from torch.distributed.elastic.multiprocessing.errors import record  # see the imports

    def main_undoing_on_failure() -> object:
        try:
            return main(argv)
        except BaseException:
            for undo in _undo:
                undo()
            raise

    @record
    def entry() -> int:
        try:
            result = main_undoing_on_failure()
        except UsageError as e:
            return report_usage_error(e)
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (training/preempt.py)
            say("interrupted (Ctrl-C); nothing saved since the last checkpoint")
            return 128 + signal.SIGINT
        except BrokenPipeError:  # `... | head`: the reader stopped reading; not an error here
            silence_stdout()
            return 0
        except OSError as e:
            if e.errno not in WRITE_ERRORS:
                raise
            say(f"error: {write_error_line(e)}")
            return 1
        # A tool's main() may return its exit status; a training script returns its summary.
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    try:
        status = entry() or 0  # `record` turns SystemExit(0) into None
    except BaseException as e:
        if not _left_alive():
            raise
        status = _report(e)  # the traceback, once; `record` has written the error file
    if _left_alive():  # any way out once a group was left alive, a SystemExit(0) too
        exit_without_teardown(status)
    return status


def report_usage_error(e: UsageError) -> int:
    """`e` as one `error:` line from global rank 0 (or from each rank, `every_rank`); the exit
    status, 2. The other ranks are silent, but torchrun may name one of them first: its
    report shows the line, which each rank writes as its error file."""
    if e.every_rank or os.environ.get("RANK", "0") == "0":
        say(f"error: {e}")
    else:
        write_error_file(f"error: {e}")
    return 2


def say(line: str) -> None:
    """`line` on stderr and as torchrun's error file (its failure report shows it)."""
    print(line, file=sys.stderr, flush=True)
    write_error_file(line)


def write_error_file(line: str) -> None:
    """Where torchrun asked for one (TORCHELASTIC_ERROR_FILE), the error line in the format
    `record` writes, with the line where the traceback would be: torchrun's report shows it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)


def _left_alive() -> bool:
    """Did `exit_on_error` leave a group alive, and does it still exist? (A test that only
    pretends to have a group, with init and destroy stubbed out, has nothing to protect.)"""
    import torch.distributed as dist  # see the imports at the top

    return _group_left_alive and dist.is_initialized()


# A collective whose peer has gone (killed, crashed): what a rank that was waiting for it
# meets. Not its own failure, and torchrun's report names the rank that failed first.
PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer(?: \[[^]]*\]:\d+)?")


def _report(e: BaseException) -> int:
    """What the interpreter would print for `e`, uncaught; the exit status it would give. A
    peer gone from a collective is one line instead of the traceback of the collective."""
    if isinstance(e, SystemExit):
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    gone = PEER_GONE.search(str(e)) if isinstance(e, RuntimeError) else None
    if gone:
        rank = os.environ.get("RANK", "0")
        print(f"error: rank {rank}: a peer left during a collective ({gone[0]})", file=sys.stderr)
        return 1
    traceback.print_exception(e)
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def exit_without_teardown(status: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(status)
