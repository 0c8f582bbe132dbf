"""Text as bytes, for the language model (`--model gpt`): no tokenizer, no download.

    --dataset stdlib                  the running interpreter's own standard library: its .py
                                      files, found through sysconfig (a venv, a conda env and
                                      a system Python all answer with the stdlib they run on)
    --dataset text --data-dir PATH    a text file, or a folder of them (read recursively)

A token is a byte (vocabulary 256), so any file is text to the model; the only refusals are
a corpus with no text at all (empty, or every file binary: a NUL byte in its first 8 KB, git's
rule) and one too short for a single window of --context + 1 bytes. A file that cannot be
read is an error that names it, never a silent hole in the corpus.

Files are read in sorted order of their path relative to the root, so every rank (and every
run) builds the same byte string. The split into train and eval is stable:

- stdlib: by file. A file goes to eval when the CRC-32 of its relative path (posix form) is
  0 mod 20, about 5% of the files; a file is in one split only, whatever the Python version
  holds besides it. Test suites (folders named test, tests, idle_test) and site-packages are
  left out: the tests are half of the bytes and mostly repeat the library's own text.
- text: by position. The concatenated corpus's last 10% (at least one window) is eval, so a
  single file splits too. Hidden files and folders (.git/, .DS_Store) are left out.

A sample is one window of context + 1 bytes: input bytes [0, context) and next-byte targets
[1, context + 1). Window i starts at byte i x context, so consecutive windows share one byte
and every byte but the first is a target exactly once. Windows are a map-style Dataset,
indexed like the image datasets: DistributedSampler shards them, and resume skips them
exactly. A cap of N windows (--train-size, --eval-size) keeps N windows spread evenly over
the whole split (window floor(k x M / N) for k < N, of M), not the first N: those would all
come from the alphabetically first files.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from core.errors import UsageError

VOCAB = 256  # one token per byte value
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
EVAL_EVERY = 20  # stdlib: a file whose path hash is 0 mod 20 is eval (about 5%)
EVAL_FRACTION = 0.1  # text: the last 10% of the bytes
BINARY_PROBE = 8192  # bytes looked at for a NUL (git's heuristic)


class ByteWindows(Dataset):
    """(input, target) pairs of `context` bytes each (int64, for nn.Embedding and the loss),
    from fixed windows of `data`; `limit` > 0 keeps that many windows spread over it."""

    def __init__(self, data: torch.Tensor, context: int, limit: int = 0) -> None:
        self.data, self.context = data, context
        self.total = (len(data) - 1) // context  # windows of context + 1 bytes, stride context
        self.n = self.total if limit <= 0 else min(limit, self.total)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.n:
            raise IndexError(f"window {index} of {self.n}")
        start = index * self.total // self.n * self.context  # evenly spread when capped
        window = self.data[start : start + self.context + 1].long()
        return window[:-1], window[1:]


def stdlib_root() -> Path:
    """The standard library the running interpreter uses (under a venv: the base one's)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The library's .py files under `root`, sorted by relative path, without SKIP_DIRS
    (pruned, not filtered: a system Python's site-packages can hold gigabytes)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_eval_file(relative: str) -> bool:
    """The stdlib split: stable across runs, machines and Python versions for a given path."""
    return zlib.crc32(relative.encode()) % EVAL_EVERY == 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:BINARY_PROBE]


def _bytes(chunks: list[bytes]) -> torch.Tensor:
    joined = bytearray(b"".join(chunks))
    return (
        torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    )


def _check_length(data: torch.Tensor, context: int, what: str) -> None:
    if len(data) < context + 1:
        raise UsageError(
            f"{what} has {len(data)} bytes, fewer than one window of --context {context} + 1: "
            "give it more text or a smaller --context"
        )


def stdlib_corpus(root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and eval bytes of the standard library under `root` (default: this
    interpreter's), each the concatenation of its files in sorted order."""
    root = root or stdlib_root()
    files = stdlib_files(root) if root.is_dir() else []
    if not files:
        raise UsageError(
            f"--dataset stdlib: no .py files under {root}, the standard library this Python "
            "reports (sysconfig); a zipped standard library is not read: use --dataset text"
        )
    train, evals = [], []
    for path in files:
        relative = path.relative_to(root).as_posix()
        (evals if is_eval_file(relative) else train).append(_read(path))
    return _bytes(train), _bytes(evals)


def text_files(root: Path) -> list[Path]:
    """`root` itself if it is a file, else every file below it but hidden ones (.git/ and
    the like), sorted by relative path."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UsageError(f"--data-dir {root} does not exist")

    def refuse(e: OSError) -> None:
        raise UsageError(f"cannot list {e.filename or root}: {e.strerror or e}")

    files = []
    for folder, dirs, names in os.walk(root, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder, n) for n in names if not n.startswith(".")]
    files = [p for p in files if p.is_file()]  # not a FIFO or a dangling link
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_corpus(root: Path, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The train and eval bytes of a text file or folder: its text files (binary ones are
    skipped) concatenated in sorted order, the last EVAL_FRACTION of the bytes for eval, and
    at least one window of `context` + 1."""
    files = text_files(root)
    chunks = [data for data in map(_read, files) if not _is_binary(data)]
    if not any(chunks):
        what = "is empty" if not files else "holds no text (every file is empty or binary)"
        raise UsageError(f"--data-dir {root} {what}: --dataset text reads text files")
    data = _bytes(chunks)
    cut = len(data) - max(int(len(data) * EVAL_FRACTION), context + 1)
    if cut < context + 1:
        raise UsageError(
            f"--data-dir {root} has {len(data)} bytes of text, too few for one training and "
            f"one eval window of --context {context} + 1 bytes: give it more text or a "
            "smaller --context"
        )
    return data[:cut], data[cut:]


def text_datasets(
    name: str,
    data_dir: str | None,
    *,
    context: int,
    train_size: int = 0,
    eval_size: int = 0,
) -> tuple[ByteWindows, ByteWindows]:
    """The train and eval windows of --dataset stdlib or text (see the module docstring)."""
    if name == "stdlib":
        train, evals = stdlib_corpus()
        where = "--dataset stdlib"
    else:
        if not data_dir:
            raise UsageError("--dataset text needs --data-dir (a text file or a folder)")
        train, evals = text_corpus(Path(data_dir), context)
        where = f"--data-dir {data_dir}"
    _check_length(train, context, f"the training split of {where}")
    _check_length(evals, context, f"the eval split of {where}")
    return ByteWindows(train, context, train_size), ByteWindows(evals, context, eval_size)
