"""One run per --out-dir: a second writer is refused in one line while the first one lives,
the folder is free again the moment the holder dies (even by SIGKILL), and pruning never
deletes a temporary file whose writer is still alive."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import train_dp
from core.errors import run_cli
from tests.test_training_checkpoint import ONE, _small_state
from training.checkpoint import CheckpointManager
from training.outdir_lock import LOCK_NAME, unlock_out_dir, writer_gone
from training.runlog import claim_out_dir

ROOT = Path(__file__).resolve().parent.parent


def _holder(out: Path) -> subprocess.Popen:
    """Another process that holds `out`'s lock (as a run's rank 0 does) until killed. It
    imports the lock module alone (no torch), so it starts in a fraction of a second."""
    code = (
        "import sys, time; from training.outdir_lock import lock_out_dir; "
        "assert lock_out_dir(sys.argv[1]) is None; print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_until_the_holder_dies(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        assert run_cli(train_dp.main, ["--out-dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out-dir {out} is in use"), err
        assert f"pid {holder.pid} on " in err[0] and "stop them (kill PID)" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "the refused run wrote"
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the kernel drops the lock
        holder.wait()
    # The folder is free again (the lock file left behind means nothing): the claim passes.
    claim_out_dir(out, resume="auto", overwrite=False, env=ONE)
    unlock_out_dir(out)
    # Temp files in the checkpoint folder: one of a writer still alive (a `sleep`), one of a
    # writer that is gone. Pruning after a save deletes only the dead writer's file.
    live = subprocess.Popen(["sleep", "60"])
    try:
        manager = CheckpointManager(out, keep=2, env=ONE)
        live_tmp = manager.folder / f".step-00000009.pt.tmp-{live.pid}"
        dead_tmp = manager.folder / f".step-00000008.pt.tmp-{_dead_pid()}"
        manager.folder.mkdir()
        live_tmp.write_bytes(b"half")
        dead_tmp.write_bytes(b"half")
        manager.save(_small_state(1))
        assert live_tmp.read_bytes() == b"half" and not dead_tmp.exists()
    finally:
        live.kill()
        live.wait()


def _dead_pid() -> int:
    """A pid that no process has: a child that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_pruning_keeps_the_temp_files_of_live_writers(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        assert not writer_gone(tmp_path / f".step-00000003.pt.tmp-{live.pid}")
        assert writer_gone(tmp_path / f".step-00000003.pt.tmp-{_dead_pid()}")
        assert writer_gone(tmp_path / f".step-00000003.pt.tmp-{os.getpid()}")  # our own, done
        assert not writer_gone(tmp_path / ".step-00000003.pt.tmp-x")  # not a pid: keep
    finally:
        live.kill()
        live.wait()


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, capsys):
    # (What an unwritable folder gives too, with "Permission denied"; as root nothing is.)
    (tmp_path / LOCK_NAME).mkdir()
    assert run_cli(train_dp.main, ["--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: --out-dir {tmp_path}: cannot create its lock file .run.lock (Is a directory)\n"
    )
