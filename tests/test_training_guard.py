"""What stops a run that would go wrong silently (training/guard.py), and the refusals of
hostile or malformed input (training/checkpoint/schema.py, the flags' types): each case is
one `error:` line and a non-zero exit, with nothing written. tests/test_inputs_fuzz.py (slow) runs
over three hundred such cases; these are the representative few of the default suite."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import train_ddp
import train_dp
from core.dist import DistEnv
from core.errors import UsageError, run_cli
from tests.fake_datasets import _idx, write_cifar10, write_mnist
from tests.multiproc import run_world
from training.checkpoint import load_checkpoint
from training.guard import LossWatch, check_same_flags, strict_json
from training.runlog import RunLog

TINY = ["--model", "mlp", "--train-size", "64", "--eval-size", "16", "--batch-size", "8",
        "--no-eval", "--log-every", "4"]  # fmt: skip
ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
              device=torch.device("cpu"))  # fmt: skip


def one_error_line(capsys, code: int) -> str:
    """The one `error:` line of a refused run (stderr holds nothing else)."""
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--lr", "inf"], "argument --lr: must be a finite number above 0, got inf"),
        (["--lr", "nan"], "argument --lr: must be a finite number above 0"),
        (["--lr", "0"], "argument --lr: must be a finite number above 0"),
        (["--momentum", "1.3"], "argument --momentum: must be in [0, 1), got 1.3"),
        (["--momentum", "5"], "argument --momentum: must be in [0, 1)"),
        (["--weight-decay", "inf"], "argument --weight-decay: must be a finite number, 0 or"),
        (["--eps", "nan"], "argument --eps: must be a finite number above 0"),
        (["--seed", str(2**64)], "argument --seed: a seed must be 0 to 4294967295"),
        (["--out-dir", ""], "argument --out-dir: needs a folder name, got an empty string"),
    ],
)
def test_nonsense_hyperparameters_are_refused_at_parse_time(capsys, flags, says):
    assert says in one_error_line(capsys, run_cli(train_dp.main, flags))


def test_huge_timeout_is_refused_at_parse_time(capsys):
    line = one_error_line(capsys, run_cli(train_ddp.main, ["--timeout", str(10**15)]))
    assert "argument --timeout: seconds must be 1 to 10000000" in line


def test_rank_outside_the_world_says_so_on_that_rank(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")  # rank 0 alone reported usage errors: this one was silent
    line = one_error_line(capsys, run_cli(train_ddp.main, []))
    assert line.startswith("error: RANK=5 is outside WORLD_SIZE=2")


@pytest.mark.parametrize(
    "path, says",
    [
        ("file", "it is not a folder"),
        ("file/below", "is not a folder"),
        ("/proc/no-such-run", "this run cannot write there"),
        ("/dev/null", "it is not a folder"),
    ],
)
def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, path, says):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / path if not path.startswith("/") else Path(path)
    line = one_error_line(capsys, run_cli(train_dp.main, [*TINY, "--out-dir", str(out)]))
    assert line.startswith(f"error: --out-dir {out}: ") and says in line


def test_divergence_stops_before_a_nonfinite_checkpoint(tmp_path, capsys):
    """--lr 1e6: the loss is nan from step 3 on. The run stops with one line naming the step
    and --lr; every checkpoint it kept has finite weights (rotation, --keep 2, would otherwise
    have kept only nan ones) and no summary.json is written."""
    out = tmp_path / "out"
    flags = [*TINY, "--lr", "1e6", "--save-every", "1", "--keep", "2", "--out-dir", str(out)]
    line = one_error_line(capsys, run_cli(train_dp.main, flags))
    assert line.startswith("error: training diverged: ") and "--lr (now 1e+06)" in line
    kept = sorted((out / "checkpoints").glob("step-*.pt"))
    assert kept, "the steps before the divergence were saved"
    for path in kept:
        weights = load_checkpoint(path)["model"].values()  # load_checkpoint refuses non-finite
        assert all(bool(torch.isfinite(w).all()) for w in weights)
    assert not (out / "summary.json").exists()


def test_loss_watch_names_the_first_nonfinite_step():
    watch = LossWatch(Namespace(amp="none", lr=0.5, warmup_steps=0), torch.device("cpu"))
    for step, loss in enumerate([1.0, 0.5, math.inf, math.nan], start=1):
        watch.see(torch.tensor(loss), step)
    watch.check(0.7, 2)  # a finite mean: nothing to say
    with pytest.raises(UsageError, match=r"the loss is nan at step 3; lower --lr \(now 0.5\)"):
        watch.check(math.nan, 4)


def test_summary_json_is_strict_json(tmp_path):
    """JSON has no nan or inf: a non-finite number is written as null."""
    RunLog(ONE, tmp_path).write_summary({"loss": math.nan, "history": [{"x": -math.inf}]})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=refuse) == {"loss": None, "history": [{"x": None}]}
    assert strict_json({"a": (1.0, math.nan)}) == {"a": [1.0, None]}


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """ENOSPC at the first checkpoint's fsync: the error names the file (a failed write names
    none) and why, with exit status 1 rather than a traceback."""
    import training.checkpoint.files as files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    code = run_cli(train_dp.main, [*TINY, "--max-steps", "1", "--out-dir", str(tmp_path / "o")])
    line = one_error_line(capsys, code)
    assert code == 1
    assert line.startswith(f"error: cannot write {tmp_path / 'o' / 'checkpoints'}/step-00000001")
    assert "No space left on device" in line and "another --out-dir" in line


@pytest.mark.parametrize("kind", ["fewer labels", "label 10"])
def test_labels_are_checked_at_load(tmp_path, capsys, kind):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_4"  # past the first-sample probe
    entry = pickle.loads(batch.read_bytes())
    if kind == "fewer labels":
        entry["labels"] = entry["labels"][:-2]
    else:
        entry["labels"][3] = 10
    batch.write_bytes(pickle.dumps(entry))
    flags = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    flags.append("--trust-data-dir")  # a re-packed copy: its MD5s are not torchvision's
    line = one_error_line(capsys, run_cli(train_dp.main, flags))
    # CIFAR-10's batches are checked file by file as they are read (data/datasets.py), so the
    # line names the file; MNIST's labels are checked as one array (test_data_datasets.py).
    assert "data_batch_4: not a CIFAR-10 batch file" in line
    assert ("'labels' is not a list of" if kind == "fewer labels" else "not a class 0..9") in line


@pytest.mark.parametrize("kind", ["fewer labels", "label 10"])
def test_mnist_labels_are_checked_at_load(tmp_path, capsys, kind):
    arrays = write_mnist(tmp_path)
    labels = arrays["train_labels"].copy()
    if kind == "fewer labels":
        labels = labels[:-2]
    else:
        labels[3] = 10
    _idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    flags = ["--dataset", "mnist", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")]
    line = one_error_line(capsys, run_cli(train_dp.main, flags))
    assert line.endswith(
        "the training split has 60 images but 58 labels"
        if kind == "fewer labels"
        else "a training label is 10; labels are 0 to 9"
    )


# ----------------------------------------------------- checkpoints validated whole


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good")
    assert run_cli(train_ddp.main, [*TINY, "--epochs", "1", "--out-dir", str(out)]) == 0
    return out / "checkpoints" / "step-00000008.pt"


def _nan_weights(s: dict) -> None:
    s["model"] = {k: torch.full_like(v, math.nan) for k, v in s["model"].items()}


MUTATIONS = {
    "no scheduler": (lambda s: s.pop("scheduler"), "scheduler state is missing or malformed"),
    "no step_in_epoch": (lambda s: s.pop("step_in_epoch"), "(no step_in_epoch)"),
    "args without batch_size": (
        lambda s: s["args"].pop("batch_size"),
        "args.batch_size is None, not a whole number of at least 1",
    ),
    "step_in_epoch 10**6": (
        lambda s: s.update(step_in_epoch=10**6),
        "do not fit this run's 8 steps per epoch",
    ),
    "step -100": (lambda s: s.update(step=-100), "step is -100, not a whole number of at least 0"),
    "step '128'": (lambda s: s.update(step="128"), "step is '128', not a whole number"),
    "nan weights": (_nan_weights, "holds nan or inf: the run that wrote it had diverged"),
}


@pytest.mark.parametrize("kind", MUTATIONS)
def test_a_malformed_checkpoint_is_refused_before_anything_is_written(good, tmp_path, capsys, kind):
    """Every key the resume reads is checked (type, range, fit with this run) before any
    state changes; the refused run leaves --out-dir as it found it: not even created."""
    mutate, says = MUTATIONS[kind]
    state = torch.load(good, weights_only=True)
    mutate(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "out"
    flags = [*TINY, "--epochs", "2", "--resume", str(bad), "--out-dir", str(out)]
    line = one_error_line(capsys, run_cli(train_ddp.main, flags))
    assert line.startswith(f"error: {bad}: ") and says in line, line
    assert not out.exists()


class _System:  # unpickles as a call of os.system, for a full unpickler
    def __reduce__(self):
        return (os.system, ("echo ran",))


def test_a_malicious_checkpoint_keeps_the_real_reason(tmp_path, capsys):
    """torch's refusal says why (the global the file asks for), and its advice to load with
    weights_only=False (turning the protection off) is left out."""
    bad = tmp_path / "evil.pt"
    torch.save({"model": _System()}, bad)
    out = tmp_path / "out"
    line = one_error_line(
        capsys, run_cli(train_ddp.main, [*TINY, "--resume", str(bad), "--out-dir", str(out)])
    )
    assert "unsupported GLOBAL posix.system" in line, line
    assert "weights_only" not in line and "trust" not in line
    assert not out.exists()


def test_an_unreadable_checkpoint_is_not_called_corrupt(good, monkeypatch):
    import training.checkpoint.files as files

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(good))

    monkeypatch.setattr(files.zipfile, "ZipFile", denied)  # root reads any file: pretend
    with pytest.raises(UsageError, match=r"cannot read the file \(Permission denied\)"):
        load_checkpoint(good)


# ------------------------------------------------------------ flag agreement


def _compare(rank: int, world_size: int) -> str:
    args = train_ddp.parse_args(
        ["--lr", "0.05" if rank == 0 else "0.06", "--sync", "ddp" if rank < 2 else "overlap"]
    )
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    try:
        check_same_flags(args, env)
    except UsageError as e:
        return str(e)
    return "agreed"


@pytest.mark.slow  # three fresh interpreters importing torch: some 5 s idle, 20 s under load
def test_ranks_with_different_flags_are_refused_by_every_rank():
    """One all_gather_object at start-up: every rank raises the same line, naming each flag
    that differs and which ranks hold which value (instead of diverged replicas, or a hang
    in the first collective whose size differs)."""
    results = run_world(_compare, 3, timeout=60)
    assert (
        results
        == [
            "the ranks were started with different flags: --lr (rank 0: 0.05; ranks 1, 2: 0.06), "
            "--sync (ranks 0, 1: 'ddp'; rank 2: 'overlap'); every rank needs the same command line"
        ]
        * 3
    )
