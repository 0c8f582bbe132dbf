"""Checkpoints written in the background (--async-save: training/checkpoint/background.py,
and dcp.async_save in training/sharded.py).

- The file holds the state at the step: with the writer held back (TRAIN_SLOW=save), the live
  tensors are changed in place before it reads a byte, and the file still holds the values of
  the step, tied weights still tied.
- A write that fails is one `error:` line and a non-zero exit.
- A wait for the write in flight is logged when it reads as one at the line's precision.
- Oracle (slow): float32, ddp and zero2, at 2 and 3 ranks: the async-written checkpoints equal
  the synchronous run's bit for bit, and a run resumed from one ends bit-identical to the
  straight run, while the writer was held back long enough that training had gone on.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import signal
import threading
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

import train_dp
from core.dist import DistEnv
from core.errors import run_cli
from tests.multiproc import WorldFailed, run_world
from tools import convert
from training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, training_state
from training.checkpoint import background as background_module

ONE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
              device=torch.device("cpu"))  # fmt: skip
ARGS = Namespace(model="tied", batch_size=4, lr=0.1)


def _tied_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    model[2].weight = model[0].weight  # one storage under two names, as gpt's head is tied
    return model


@pytest.mark.oracle
def test_the_file_holds_the_step_not_what_training_did_during_the_write(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_SLOW", "save:0.2")  # the writer reads nothing for 0.2 s
    model = _tied_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)

    def step() -> None:
        model(torch.ones(2, 8)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    step()
    manager = CheckpointManager(tmp_path, keep=2, env=ONE)
    manager.enable_async()

    def save(n: int) -> None:
        manager.save_training(ARGS, model, optimizer, scheduler, None, epoch=0, step=n,
                              step_in_epoch=n)  # fmt: skip

    save(1)
    expected = training_state(model, optimizer, scheduler, None, epoch=0, step=1,
                              step_in_epoch=1, world_size=1, args=ARGS)  # fmt: skip
    expected = copy.deepcopy(expected)  # the values at the step
    assert manager.background._thread.is_alive()  # still held back: nothing read yet
    for _ in range(3):  # in place, as training does: parameters, momentum, the schedule
        step()
    assert manager.background._thread.is_alive(), "the steps must land during the write"
    manager.settle()
    written = load_checkpoint(tmp_path / "checkpoint.pt")
    assert written["step"] == 1
    for key in ("model", "optimizer", "scheduler"):
        _assert_identical(written[key], expected[key], key)
    live = dict(model.state_dict())
    assert not torch.equal(written["model"]["0.weight"], live["0.weight"])  # training moved on
    tied = written["model"]["0.weight"], written["model"]["2.weight"]
    assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()

    # The next save waits for the one in flight (at most one), and reuses its buffers.
    monkeypatch.delenv("TRAIN_SLOW")
    save(2)
    save(3)
    manager.settle()
    assert sorted(p.name for p in manager.folder.iterdir()) == ["step-00000002.pt",
                                                                "step-00000003.pt"]  # fmt: skip
    assert os.readlink(tmp_path / "checkpoint.pt") == "checkpoints/step-00000003.pt"
    _assert_identical(load_checkpoint(tmp_path / "checkpoint.pt")["model"], dict(live), "model")


def _assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: differs by {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TINY = [
    "--model", "mlp", "--train-size", "32", "--eval-size", "8", "--batch-size", "8",
    "--epochs", "1", "--no-eval", "--log-every", "1000", "--gpus", "none",
]  # fmt: skip


def test_a_failed_background_write_is_one_error_line(tmp_path, monkeypatch, capsys):
    def full_disk(path, state):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("training.checkpoint.resume.write_checkpoint", full_disk)
    out = tmp_path / "run"
    status = run_cli(train_dp.main, [*TINY, "--out-dir", str(out), "--async-save"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [
        f"error: the checkpoint of step 4 was not written: cannot write "
        f"{out / 'checkpoints' / 'step-00000004.pt'}: No space left on device (free some "
        "space or choose another --out-dir; a restart fails the same way)"
    ]
    assert not (out / "summary.json").exists()  # the run did not claim to be complete


def test_preemption_leaves_only_once_the_async_save_is_on_disk(tmp_path, monkeypatch):
    """SIGUSR1 after step 2 of 4: the step-2 save goes to the background, held back 0.3 s;
    the run returns (preempted) only once that file is whole and checkpoint.pt names it."""

    def signal_at_2(rank: int):
        return lambda step: os.kill(os.getpid(), signal.SIGUSR1) if step == 2 else None

    monkeypatch.setattr(train_dp, "fault_hook", signal_at_2)
    monkeypatch.setenv("TRAIN_SLOW", "save:0.3")
    out = tmp_path / "run"
    result = train_dp.main([*TINY, "--out-dir", str(out), "--async-save"])
    assert result == {"preempted": "SIGUSR1", "steps": 2, "total_steps": 4}
    assert os.readlink(out / "checkpoint.pt") == "checkpoints/step-00000002.pt"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize(("seconds", "line"), [(0.004, None), (0.006, "0.01"), (0.59, "0.59")])
def test_a_wait_for_the_write_is_logged_only_when_it_reads_as_one(monkeypatch, seconds, line):
    """The line prints the wait with two decimals: a wait that would read "0.00 s" (the
    write ended as the wait began) is not logged. The clock is the test's: the write in
    flight ends only once the wait has read it, so the writer is always still busy."""
    released = threading.Event()
    readings = iter([100.0, 100.0 + seconds])

    def perf_counter() -> float:
        released.set()
        return next(readings)

    monkeypatch.delenv("TRAIN_SLOW", raising=False)
    logged: list[str] = []
    writer = background_module.BackgroundWriter(ONE, lambda fmt, *a: logged.append(fmt % a))
    writer.start("step 6", released.wait)
    monkeypatch.setattr(background_module, "time", Namespace(perf_counter=perf_counter))
    writer.wait("the end of the run")
    expected = (
        f"the end of the run waited {line} s for the checkpoint of step 6, still being written"
    )
    assert logged == ([] if line is None else [expected])
    assert not writer.busy()


# ------------------------------------------------------------- oracle, at 2 and 3 ranks

# float32, as the claim is "bits". 96 samples, 4 per rank: 12 steps per epoch at 2 ranks, 8
# at 3; 8 steps in all. AdamW with warm-up: an optimizer state and a learning rate that
# changes every step, so a checkpoint that missed either would show.
COMMON = [
    "--model", "mlp", "--train-size", "96", "--eval-size", "16", "--batch-size", "4",
    "--epochs", "1", "--max-steps", "8", "--no-eval", "--log-every", "1000",
    "--optimizer", "adamw", "--lr", "0.002", "--warmup-steps", "20",
]  # fmt: skip
MODES = ("ddp", "zero2")  # one file written by a thread; DCP's async_save
EXT = {"ddp": "pt", "zero2": "dcp"}
HELD = 0.5  # TRAIN_SLOW=save: seconds each background write waits before reading anything


def _known_generators(fresh: bool, rank: int) -> None:
    """Python's and NumPy's generators are not seeded by the script: a fresh run starts from
    a known state, a resumed one from garbage, so only a restored state can match."""
    random.seed(1 if fresh else 1000 + rank)
    np.random.seed(1 if fresh else 1000 + rank)


def _oracle_runs(rank: int, world_size: int, root: str) -> list[tuple[str, bool]]:
    import train_ddp

    waits: list[tuple[str, bool]] = []  # (the save waited for, whether it was still in flight)
    wait = background_module.BackgroundWriter.wait

    def recording_wait(self, before: str) -> None:
        if self._thread is not None:
            waits.append((self._what, self._thread.is_alive()))
        wait(self, before)

    background_module.BackgroundWriter.wait = recording_wait

    def run(mode: str, name: str, *flags: str) -> None:
        out = Path(root) / mode / name
        _known_generators(name != "resumed", rank)
        train_ddp.main([*COMMON, "--sync", mode, "--out-dir", str(out), *flags])

    for mode in MODES:
        run(mode, "straight", "--save-every", "2", "--keep", "4")  # synchronous: steps 2, 4, 6, 8
        os.environ["TRAIN_SLOW"] = f"save:{HELD}"
        try:
            run(mode, "async", "--save-every", "2", "--async-save", "--max-steps", "4")
        finally:
            del os.environ["TRAIN_SLOW"]
        step2 = Path(root) / mode / "async" / "checkpoints" / f"step-00000002.{EXT[mode]}"
        run(mode, "resumed", "--resume", str(step2), "--async-save")  # 6 more steps, written async
        waits.append((mode, False))
    # Rank 1's part of a sharded save fails (a full disk): every rank raises the same line.
    from training import sharded

    def full_disk(self, plan, planner):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return write(self, plan, planner)

    write = sharded._Writer.write_data
    sharded._Writer.write_data = full_disk
    try:
        run("zero2", "full", "--async-save")
    except CheckpointError as e:
        waits.append(("error", str(e)))
    return waits


def _single_file(folder: Path, tmp: Path) -> dict:
    """A checkpoint as one dict: a sharded folder converted to the single-file format."""
    if folder.suffix != ".dcp":
        return load_checkpoint(folder)
    run = folder.parent.parent
    target = tmp / f"{run.parent.name}-{run.name}-{folder.name}.pt"
    convert.main([str(folder), str(target)])
    return load_checkpoint(target)


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("world_size", [2, 3])
def test_async_checkpoints_are_the_steps_and_resume_bit_identical(tmp_path, world_size):
    results = run_world(_oracle_runs, world_size, str(tmp_path), timeout=300)
    errors = [r[-1] for r in results]
    assert errors[0][0] == "error" and len(set(errors)) == 1, errors  # the same on every rank
    assert "\n" not in errors[0][1] and "the checkpoint of step 8 was not written" in errors[0][1]
    assert "rank 1's files: cannot write" in errors[0][1], errors[0][1]
    assert "No space left on device" in errors[0][1], errors[0][1]
    assert not (tmp_path / "zero2" / "full" / "checkpoint.dcp").exists()
    waits = results[0]
    for mode in MODES:
        # The save at step 4 found step 2's write still held back: steps 3 and 4 ran during it.
        mine = waits[: waits.index((mode, False))]
        assert ("step 2", True) in mine, (mode, waits)
        root, ext = tmp_path / mode, EXT[mode]
        for step in (2, 4):  # what the async run wrote, against the synchronous run's files
            name = f"checkpoints/step-{step:08d}.{ext}"
            a = _single_file(root / "async" / name, tmp_path)
            b = _single_file(root / "straight" / name, tmp_path)
            for key in ("model", "optimizer", "scheduler", "rng", "step", "epoch"):
                _assert_identical(a[key], b[key], f"{mode} step {step}: {key}")
        a = _single_file(root / "resumed" / f"checkpoints/step-00000008.{ext}", tmp_path)
        b = _single_file(root / "straight" / f"checkpoints/step-00000008.{ext}", tmp_path)
        assert a["optimizer"]["state"], "AdamW's moments must exist for this to mean much"
        for key in ("model", "optimizer", "scheduler", "rng"):
            _assert_identical(a[key], b[key], f"{mode} resumed: {key}")


OTHER_MODES = ("allreduce", "overlap", "local-sgd", "diloco", "zero1", "zero3", "torch-zero1",
               "fsdp2")  # fmt: skip


def _every_mode(rank: int, world_size: int, root: str) -> None:
    import train_ddp

    for mode in OTHER_MODES:
        for kind, flags in (("sync", []), ("async", ["--async-save"])):
            _known_generators(True, rank)
            os.environ["TRAIN_SLOW"] = f"save:{HELD / 2}" if flags else ""
            out = str(Path(root) / mode / kind)
            train_ddp.main([*COMMON, "--sync", mode, "--save-every", "2", "--out-dir", out, *flags])
    del os.environ["TRAIN_SLOW"]


@pytest.mark.slow
@pytest.mark.oracle
def test_every_other_sync_mode_writes_the_synchronous_checkpoint(tmp_path):
    """The other modes' own parts (local-sgd's replicas, diloco's outer state, fsdp2's and
    torch-zero1's torch-made state dicts, zero3's units) through --async-save: the last
    checkpoint equals the synchronous run's bit for bit, every save held back while training
    went on (hsdp and torch-hsdp take the zero3 and fsdp2 paths)."""
    run_world(_every_mode, 2, str(tmp_path), timeout=300)
    for mode in OTHER_MODES:
        ext = "dcp" if (tmp_path / mode / "sync" / "checkpoint.dcp").exists() else "pt"
        a = _single_file(tmp_path / mode / "async" / f"checkpoint.{ext}", tmp_path)
        b = _single_file(tmp_path / mode / "sync" / f"checkpoint.{ext}", tmp_path)
        assert a["step"] == b["step"] == 8, mode
        for key in ("model", "optimizer", "scheduler", "rng", "ranks"):
            if key in a or key in b:
                _assert_identical(a.get(key), b.get(key), f"{mode}: {key}")


# ------------------------------------------------------------------------- torture

# SIGKILL of one rank, or of every rank at once (the whole job), at a random moment of a
# random save's background write (held back TORTURE_HELD s before it writes a byte, and as
# long again halfway through the file), KILLS times per mode (`make torture-async` sets
# ASYNC_TORTURE_KILLS). After each kill the newest checkpoint must be whole and loadable (or
# absent, when the kill came in the first save), every file or folder under a real name too,
# and `--resume auto` must end bit-identical to a run that was never killed.
KILLS = int(os.environ.get("ASYNC_TORTURE_KILLS", "1"))  # per mode; 1: the job
TORTURE_HELD = 0.3
TORTURE = [*COMMON, "--save-every", "2", "--keep", "2"]


def _straight(rank: int, world_size: int, root: str) -> None:
    import train_ddp

    for mode in MODES:
        _known_generators(True, rank)
        train_ddp.main([*TORTURE, "--sync", mode, "--out-dir", str(Path(root) / mode)])


def _killed(rank: int, world_size: int, out: str, mode: str, plan: tuple) -> None:
    """Train with --async-save; `victim` (a rank, or "job": every rank) SIGKILLs itself
    `delay` s after the `save_no`-th save has been handed to the background."""
    import train_ddp
    from training import loop

    victim, save_no, delay = plan
    saves = [0]
    save = loop.TrainLoop.save

    def save_then_arm(self, *position) -> None:
        save(self, *position)
        saves[0] += 1
        if saves[0] == save_no and victim in ("job", rank):
            kill = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
            kill.daemon = True
            kill.start()

    loop.TrainLoop.save = save_then_arm
    os.environ["TRAIN_SLOW"] = f"save:{TORTURE_HELD}"
    flags = [*TORTURE, "--sync", mode, "--out-dir", out, "--async-save", "--resume", "auto"]
    _known_generators(True, rank)
    train_ddp.main(flags)


def _resume(rank: int, world_size: int, out: str, mode: str, fresh: bool) -> None:
    import train_ddp

    _known_generators(fresh, rank)  # fresh: no checkpoint yet, the run starts over
    train_ddp.main([*TORTURE, "--sync", mode, "--out-dir", out, "--async-save", "--resume", "auto"])


def _newest(out: Path, mode: str) -> int | None:
    """The step of the newest checkpoint, after checking that it and every checkpoint under a
    real name is whole and loadable; None when there is none yet."""
    from training.sharded import load_sharded_state

    load = load_sharded_state if mode == "zero2" else load_checkpoint
    for path in (out / "checkpoints").glob(f"step-*.{EXT[mode]}"):
        load(path)  # raises on a half-written or corrupt one
    pointer = out / f"checkpoint.{EXT[mode]}"
    return load(pointer)["step"] if pointer.exists() else None


@pytest.mark.slow
@pytest.mark.oracle
def test_kills_during_async_saves_leave_a_whole_checkpoint_and_resume_exactly(tmp_path):
    seed = int(os.environ.get("ASYNC_TORTURE_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    run_world(_straight, 2, str(tmp_path / "straight"), timeout=240)
    counts = {"kills": 0, "newest was the save in flight": 0, "newest was an older one": 0,
              "no checkpoint yet": 0, "resumed bit-identical": 0}  # fmt: skip
    for mode in MODES:
        for i in range(KILLS):
            victim = ("job", 0, 1)[i % 3]
            save_no = rng.randint(1, 4)  # steps 2, 4, 6, 8
            delay = rng.uniform(0, 2.5 * TORTURE_HELD)
            out = tmp_path / f"{mode}-{i}"
            where = f"{mode} kill {i}: victim {victim}, save {save_no}, {delay:.3f} s (seed {seed})"
            with pytest.raises(WorldFailed, match="exit code -9"):
                run_world(_killed, 2, str(out), mode, (victim, save_no, delay), timeout=240)
            counts["kills"] += 1
            newest = _newest(out, mode)
            if newest is None:
                counts["no checkpoint yet"] += 1
            elif newest == 2 * save_no:
                counts["newest was the save in flight"] += 1
            else:
                assert newest < 2 * save_no, where
                counts["newest was an older one"] += 1
            run_world(_resume, 2, str(out), mode, newest is None, timeout=240)
            ext = EXT[mode]
            a = _single_file(out / f"checkpoints/step-00000008.{ext}", tmp_path)
            straight = tmp_path / "straight" / mode / f"checkpoints/step-00000008.{ext}"
            b = _single_file(straight, tmp_path)
            for key in ("model", "optimizer", "scheduler", "rng"):
                _assert_identical(a[key], b[key], f"{where}: {key}")
            counts["resumed bit-identical"] += 1
    print(f"\nasync-save torture (seed {seed}): {counts}")
    assert counts["resumed bit-identical"] == counts["kills"] == len(MODES) * KILLS
