"""Checkpoint files: rotation and the `checkpoint.pt` pointer, a writer killed before its
rename, every kind of bad file refused with one clear line, and all-or-nothing restore."""

import hashlib
import io
import multiprocessing as mp
import os
import random
import signal
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ddp
from core.dist import DistEnv
from core.errors import UsageError, run_cli
from training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    point,
    restore_training_state,
    rng_state,
    set_rng_state,
    training_state,
)
from training.faults import fault_hook
from training.models import build_model

ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
              device=torch.device("cpu"))  # fmt: skip
ARGS = Namespace(model="mlp", batch_size=4, lr=0.1)


def _small_state(step: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    return training_state(
        model, optimizer, scheduler, None, epoch=0, step=step, step_in_epoch=step,
        world_size=1, args=ARGS,
    )  # fmt: skip


def test_rotation_keeps_the_newest_and_points_at_the_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, env=ONE)
    assert manager.find("auto") is None and manager.find(None) is None  # fresh start
    for step in (1, 2, 3, 4):
        manager.save(_small_state(step))
    assert sorted(p.name for p in manager.folder.iterdir()) == [
        "step-00000003.pt",
        "step-00000004.pt",
    ]
    assert os.readlink(tmp_path / "checkpoint.pt") == "checkpoints/step-00000004.pt"
    assert manager.find("auto") == manager.path_for(4)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert manager.find("elsewhere.pt") == Path("elsewhere.pt")


def _save_and_die_before_rename(out_dir: str) -> None:
    def kill_instead(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)

    os.replace = kill_instead  # the rename of the data file is the first replace
    CheckpointManager(Path(out_dir), keep=3, env=ONE).save(_small_state(2, seed=1))


def test_writer_killed_between_write_and_rename_leaves_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3, env=ONE)
    manager.save(_small_state(1))
    before = manager.path_for(1).read_bytes()

    child = mp.get_context("fork").Process(
        target=_save_and_die_before_rename, args=(str(tmp_path),)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    leftovers = [p.name for p in manager.folder.iterdir() if p.name.startswith(".step-00000002")]
    assert len(leftovers) == 1, "the child must have died with its temp file written"
    assert (manager.folder / leftovers[0]).stat().st_size > 0

    assert not manager.path_for(2).exists()
    assert manager.find("auto") == manager.path_for(1)
    assert manager.path_for(1).read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    manager.save(_small_state(3))  # the next save clears what the killed writer left
    assert sorted(p.name for p in manager.folder.iterdir()) == [
        "step-00000001.pt",
        "step-00000003.pt",
    ]


def test_rng_states_round_trip():
    saved = rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    set_rng_state(saved)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def _live(seed: int):
    torch.manual_seed(seed)
    model = build_model("mlp", 3, 8, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(model(torch.randn(4, 3, 8, 8)).sum()).backward()
    scaler.step(optimizer)
    scaler.update(new_scale=64.0 + seed)
    scheduler.step()
    return model, optimizer, scheduler, scaler


def test_restore_is_exact_and_all_or_nothing():
    model, optimizer, scheduler, scaler = _live(seed=0)
    state = training_state(
        model, optimizer, scheduler, scaler, epoch=1, step=1, step_in_epoch=0,
        world_size=1, args=ARGS,
    )  # fmt: skip
    fresh = _live(seed=1)
    restore_training_state(state, *fresh, source=Path("ok.pt"))
    for a, b in zip(model.parameters(), fresh[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert str(fresh[1].state_dict()) == str(optimizer.state_dict())
    assert fresh[2].state_dict() == scheduler.state_dict()
    assert fresh[3].state_dict() == scaler.state_dict() and fresh[3].get_scale() == 64.0

    # A momentum buffer of the wrong shape: refused before the model or the RNGs change.
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(7)
    other = _live(seed=2)
    params, rng_before = [p.clone() for p in other[0].parameters()], torch.get_rng_state()
    with pytest.raises(
        CheckpointError, match=r"bad\.pt: optimizer state 'momentum_buffer' of parameter 0"
    ):
        restore_training_state(state, *other, source=Path("bad.pt"))
    assert all(torch.equal(a, b) for a, b in zip(params, other[0].parameters(), strict=True))
    assert torch.equal(rng_before, torch.get_rng_state())


def test_fault_hook_spec_is_checked(monkeypatch):
    monkeypatch.setenv("TRAIN_FAULT", "explode:1:3")
    with pytest.raises(UsageError, match="TRAIN_FAULT='explode:1:3': expected KIND:RANK:STEP"):
        fault_hook(0)
    monkeypatch.setenv("TRAIN_FAULT", "kill:1:3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt: no fault
    fault_hook(1)(3)


# ------------------------------------------------ bad files through the command line

FLAGS = ["--model", "mlp", "--train-size", "32", "--eval-size", "8", "--batch-size", "4",
         "--epochs", "1", "--no-eval", "--save-every", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    assert run_cli(train_ddp.main, [*FLAGS, "--out-dir", str(out)]) == 0
    return out


class _Anything:  # pickled as a global: a weights_only load must refuse to import it
    pass


def _tamper(kind: str, good: dict, raw: bytes, path: Path) -> None:
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "corrupt bytes":
        data = bytearray(raw)
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF  # inside a tensor: torch.load alone would not notice
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "arbitrary object":
        torch.save({"model": _Anything()}, path)
    elif kind == "compressed entries":  # a zip bomb's form: small file, large entries
        with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    elif kind == "fifo":
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    else:
        state = dict(good)
        if kind == "wrong architecture":
            state["model"] = build_model("cnn", 3, 32, 10).state_dict()
        elif kind == "optimizer mismatch":
            state["optimizer"] = torch.optim.SGD(
                torch.nn.Linear(2, 2).parameters(), lr=1
            ).state_dict()
        elif kind == "other flags":
            state["args"] = {**state["args"], "momentum": 0.5, "lr": 0.5}
        elif kind == "other batches":
            state["world_size"] = 2  # 4 per rank x 2 ranks: 8 samples per step, not 4
        elif kind == "stride-0 bomb":
            # One stored float read as 10^12: the nan scan alone would allocate a terabyte.
            name = next(iter(state["model"]))
            state["model"] = {**state["model"], name: torch.zeros(1).expand(10**6, 10**6)}
        torch.save(state, path)


BAD = {
    "truncated": "not a readable checkpoint (truncated, or not written by torch.save",
    "corrupt bytes": "not a readable checkpoint (corrupt: entry archive/data/",
    "empty": "checkpoint file is empty",
    "not a dict": "not a checkpoint (holds a list)",
    "arbitrary object": "not loaded: it holds objects that a weights-only load refuses, and "
    "nothing was run (WeightsUnpickler error: Unsupported global: GLOBAL "
    "tests.test_training_checkpoint",
    "wrong architecture": "checkpoint does not fit this model (missing 1.weight",
    "optimizer mismatch": "optimizer state is for a different set of parameters (2 in the file, 6",
    "other flags": f"written with --lr 0.5 (this run: {train_ddp.parse_args([]).lr}), "
    "--momentum 0.5 (this run: 0.9)",
    "other batches": "written by a run with 8 samples per optimizer step (4 x 2 rank(s) x 1",
    "stride-0 bomb": "has shape [1000000, 1000000] (4000000000000 bytes) over 4 bytes of data",
    "compressed entries": "not a checkpoint written by torch.save (entry ",
    "fifo": "not a regular file (a fifo)",
}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoint_is_refused_with_one_line(good_run, tmp_path, capsys, kind):
    good_file = good_run / "checkpoints" / "step-00000008.pt"
    raw = good_file.read_bytes()
    before = _digest(good_run / "checkpoints")
    bad = tmp_path / "bad.pt"
    _tamper(kind, torch.load(good_file, weights_only=True), raw, bad)

    capsys.readouterr()
    code = run_cli(train_ddp.main, [*FLAGS, "--out-dir", str(good_run), "--resume", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
    assert BAD[kind] in err, err
    assert _digest(good_run / "checkpoints") == before  # nothing written, nothing deleted
    assert load_checkpoint(good_file)["step"] == 8


def test_resume_auto_refuses_a_bad_newest_file_and_a_dangling_pointer(good_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    newest = out / "checkpoints" / "step-00000009.pt"
    newest.write_bytes(b"")
    point(out / "checkpoint.pt", newest)
    capsys.readouterr()
    assert run_cli(train_ddp.main, [*FLAGS, "--out-dir", str(out), "--resume", "auto"]) == 2
    assert capsys.readouterr().err == f"error: {newest}: checkpoint file is empty\n"

    newest.unlink()
    assert run_cli(train_ddp.main, [*FLAGS, "--out-dir", str(out), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'checkpoint.pt'}: points to {newest}, which is missing\n"

    assert run_cli(train_ddp.main, [*FLAGS, "--out-dir", str(out), "--resume", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: a directory; name a checkpoint file in it\n"
