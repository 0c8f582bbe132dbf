"""Text as bytes (data/text.py): the standard-library corpus, a user's text, the windows the
samplers shard, and one-line refusals of a corpus that cannot be trained on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import UsageError
from data.datasets import build_datasets
from data.sampling import ResumableDistributedSampler, train_loader
from data.text import (
    ByteWindows,
    is_eval_file,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
    text_datasets,
)


def test_the_stdlib_is_found_sorted_and_split_stably_by_file():
    root = stdlib_root()
    # The library this interpreter imports os from, also when it runs in a venv (as here).
    assert (root / "os.py").resolve() == Path(os.__file__).resolve()
    files = stdlib_files(root)
    relative = [p.relative_to(root).as_posix() for p in files]
    assert relative == sorted(relative) and "os.py" in relative
    assert not any(
        part in ("site-packages", "test", "tests") for r in relative for part in r.split("/")
    )
    evals = [r for r in relative if is_eval_file(r)]
    assert 0.01 < len(evals) / len(relative) < 0.15  # about 1 in 20
    assert stdlib_files(root) == files  # the same files, so the same split, on every call
    train, ev = stdlib_corpus(root)
    # No file in both splits: the byte counts add up to the files', each file read once.
    sizes = {r: p.stat().st_size for r, p in zip(relative, files, strict=True)}
    assert len(ev) == sum(sizes[r] for r in evals)
    assert len(train) + len(ev) == sum(sizes.values())
    # The eval bytes are the eval files, concatenated in sorted order.
    first = files[relative.index(evals[0])].read_bytes()
    assert bytes(ev[: len(first)].tolist()) == first


def test_windows_are_context_plus_one_bytes_at_fixed_offsets():
    data = torch.arange(100, dtype=torch.uint8)
    windows = ByteWindows(data, 8)
    assert len(windows) == 12  # (100 - 1) // 8
    x, y = windows[3]
    assert x.dtype == torch.long and x.tolist() == list(range(24, 32))
    assert y.tolist() == list(range(25, 33))  # the next byte of each position
    spread = ByteWindows(data, 8, limit=4)  # 4 of the 12, spread over all of them
    assert [spread[k][0][0].item() for k in range(4)] == [0, 24, 48, 72]
    assert len(ByteWindows(data, 8, limit=50)) == 12
    with pytest.raises(IndexError):
        windows[12]


def test_text_folder_sorted_binary_skipped_last_tenth_for_eval(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"B" * 600)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_bytes(b"A" * 400)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0" * 100)  # a NUL: binary, skipped
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")  # hidden: skipped
    spec = build_datasets("text", str(tmp_path), seed=0, context=16, eval_size=2)
    train, evals = spec.train.data, spec.eval.data
    assert bytes(torch.cat([train, evals]).tolist()) == b"A" * 400 + b"B" * 600  # a/z, then b
    assert len(evals) == 100  # the last 10%
    assert spec.num_classes == 256 and len(spec.eval) == 2
    x, y = spec.train[0]
    assert x.shape == y.shape == (16,)
    single = tmp_path / "b.txt"  # a single file splits too
    train, evals = text_datasets("text", str(single), context=16)
    assert len(train.data) == 540 and len(evals.data) == 60


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "is empty"),
        (lambda d: (d / "x.bin").write_bytes(b"\0\1\2" * 50), "holds no text"),
        (lambda d: (d / "x.txt").write_bytes(b"tiny"), "too few for one training"),
    ],
)
def test_a_corpus_that_cannot_be_trained_on_is_one_line(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UsageError, match=message):
        build_datasets("text", str(tmp_path), seed=0, context=16)


def test_missing_unreadable_and_undeclared_data_dirs_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        build_datasets("text", str(tmp_path / "nope"), seed=0)
    with pytest.raises(UsageError, match="needs --data-dir"):
        build_datasets("text", None, seed=0)
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt").write_bytes(b"y" * 1000)
    real = Path.read_bytes

    def denied(path: Path) -> bytes:  # chmod 0 does not stop root, who may run the suite
        if path.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UsageError, match="cannot read .*b.txt: Permission denied"):
        build_datasets("text", str(tmp_path), seed=0, context=16)


def test_a_fresh_venv_reports_the_same_stdlib(tmp_path):
    """A venv holds no standard library of its own: sysconfig answers with its base
    interpreter's, the one stdlib_root() reads here (conda and system Pythons have theirs
    where sysconfig says too)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    code = "import sysconfig; print(sysconfig.get_paths()['stdlib'])"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    assert Path(out.stdout.strip()).resolve() == stdlib_root().resolve()


def test_a_stdlib_without_enough_py_files_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("data.text.stdlib_root", lambda: tmp_path)
    with pytest.raises(UsageError, match="no .py files"):
        build_datasets("stdlib", None, seed=0)
    (tmp_path / "m.py").write_bytes(b"x = 1\n")
    with pytest.raises(UsageError, match="fewer than one window"):
        build_datasets("stdlib", None, seed=0, context=16)


def test_a_corpus_too_small_for_the_batch_is_one_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    spec = build_datasets("text", str(tmp_path), seed=0, context=16)  # 56 training windows
    sampler = ResumableDistributedSampler(spec.train, num_replicas=2, rank=0, drop_last=True)
    with pytest.raises(UsageError, match="the training set has only 56"):
        train_loader(spec.train, 32, sampler)
    assert len(train_loader(spec.train, 28, sampler)) == 1
