"""Files a user names on a command line, read and written with one-line errors.

A path given to a `python -m` program is untrusted: it may be /dev/zero or a fifo (reading
never ends), a file of any size (reading it whole exhausts memory), or a place that cannot be
written (no permission, a file where a folder belongs, a name too long). Each case is a
UsageError naming the path, never a traceback or an out-of-memory kill.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import UsageError


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes (`what` names the kind
    of file expected, for the refusal)."""
    try:
        # O_NONBLOCK: opening a fifo for reading would otherwise wait for a writer.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"{path} is not a regular file (expected {what})")
            data = f.read(limit + 1)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{path}: larger than {limit} bytes, more than {what} holds")
    return data


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around the writing of `path`: any OSError (no permission, a file where a folder
    belongs, a name too long, a full disk) is one line naming the path."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir met a file on the way
            raise UsageError(f"cannot write {path}: a part of it is not a folder") from None
        raise UsageError(f"cannot write {e.filename or path}: {e.strerror or e}") from None
