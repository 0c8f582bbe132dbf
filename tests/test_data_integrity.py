"""Dataset files are untrusted input: a CIFAR-10 pickle is checked against torchvision's MD5
sums before it is unpickled (or the user vouches for the folder with --trust-data-dir), and
it is unpickled by a reader that builds arrays and nothing else, so a tampered file runs no
code either way."""

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

import train_dp
from core.errors import UsageError, run_cli
from data.datasets import build_datasets, load_cifar_pickle
from tests.fake_datasets import write_cifar10


class _Payload:
    """Unpickling this calls os.system: what a tampered batch file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _tamper(folder: Path, name: str, marker: Path) -> None:
    with open(folder / "cifar-10-batches-py" / name, "wb") as f:
        pickle.dump({"data": _Payload(f"touch {marker}"), "labels": []}, f, protocol=2)


def test_the_official_checksums_are_checked_before_unpickling(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    # Not the official bytes: refused by name, with the opt-in named, before any unpickling.
    with pytest.raises(
        UsageError,
        match=r"data_batch_1 is not the official CIFAR-10 file.*"
        r"add --trust-data-dir",
    ) as info:
        build_datasets("cifar10", str(tmp_path), seed=0)
    assert "\n" not in str(info.value)
    # With torchvision's table holding these files' sums, the same folder loads without the
    # opt-in: the check is the MD5 comparison itself, not a blanket refusal.
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    assert len(build_datasets("cifar10", str(tmp_path), seed=0).train) == 60
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes() + b"\0")
    with pytest.raises(UsageError, match="test_batch is not the official"):
        build_datasets("cifar10", str(tmp_path), seed=0)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_of_arrays_loads_the_same(tmp_path, protocol):
    arrays = write_cifar10(tmp_path, protocol=protocol)
    entry = load_cifar_pickle(tmp_path / "cifar-10-batches-py" / "test_batch")
    np.testing.assert_array_equal(entry["data"], arrays["test_data"])
    assert entry["labels"] == arrays["test_labels"]
    spec = build_datasets("cifar10", str(tmp_path), seed=0, trust_files=True)
    assert (len(spec.train), len(spec.eval)) == (60, 20)


def test_malformed_batches_are_refused_before_training(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    good = pickle.loads(path.read_bytes())
    bad = [
        ({**good, "labels": good["labels"][:-1]}, "not a list of 12 labels"),
        ({**good, "labels": [10] + good["labels"][1:]}, "not a class 0..9"),
        ({**good, "data": good["data"][:, :100]}, "hold 100 bytes"),
        ({**good, "data": good["data"].astype(np.float32)}, "not a 2-d uint8 array"),
        ([1, 2], "holds a list"),
    ]
    for entry, reason in bad:
        path.write_bytes(pickle.dumps(entry, protocol=2))
        with pytest.raises(UsageError, match=reason):
            build_datasets("cifar10", str(tmp_path), seed=0, trust_files=True)


def test_a_tampered_batch_runs_nothing_even_in_a_trusted_folder(tmp_path, capsys):
    # Through the script's entry point: one `error:` line, exit 2, and the payload never ran
    # (with the opt-in, the MD5 check is skipped and the restricted unpickler alone stops
    # it; without it, the MD5 check stops it first).
    write_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    _tamper(tmp_path, "data_batch_4", marker)
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    for extra, reason in (
        (["--trust-data-dir"], "data_batch_4: not a CIFAR-10 batch file (it asks to run posix"),
        ([], "data_batch_1 is not the official CIFAR-10 file"),
    ):
        assert run_cli(train_dp.main, argv + extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], lines
        assert not marker.exists(), "the tampered pickle ran its payload"
    # The payload is live: the plain unpickler torchvision uses runs it.
    pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_4").read_bytes())
    assert marker.exists()
