"""launch/fault_tolerant.sh runs: the coordinator and two replicas, each its own torchrun of one
rank, then of two. A replica SIGKILLed after step 2 (every rank of it: a lost node) is
restarted by its torchrun (--max-restarts), rejoins the survivor (which waits for it:
--min-replicas 2), is healed from it over the groups, and the job ends with both replicas
bit-identical and on the trajectory of one process taking all 2 x R x B samples of a step: no
step lost, no sample skipped or repeated. A Ctrl-C stops the job cleanly at one step, where one
replica saves, and the job resumed from that checkpoint (by fewer replicas) ends on the straight
run. A flag that every replica would refuse is one line from the script, before anything starts."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

from tests.multiproc import ROOT, Live, run_cmd
from tests.test_training_fault_tolerant import BATCH, reference

STEPS = 6


def test_a_refused_flag_is_one_line_before_the_coordinator_or_a_replica_starts(tmp_path):
    """--sync zero1, which a replica refuses (training/fault_tolerant.py check_flags): the
    script's own check of the replicas' flags says so once, with status 2, rather than every
    replica once per torchrun restart after the coordinator started. Nothing was started: no
    temporary folder (the coordinator's port file, the replicas' rendezvous files), no
    --out-dir. Run from another folder: the check finds this checkout's code from there."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_cmd(
        [str(ROOT / "launch/fault_tolerant.sh"), "2", "--sync", "zero1", "--out-dir", "run"],
        timeout=120,  # one torch import, on a loaded machine
        env={"TMPDIR": str(scratch)},
        cwd=tmp_path,
    )
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == ["error: --sync does not combine with --fault-tolerance"]
    assert result.stdout == ""
    assert not any(scratch.iterdir()) and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_killed_replica_restarts_rejoins_and_the_run_loses_no_step(tmp_path, ranks):
    flags = ["--model", "mlp", "--train-size", "96", "--batch-size", str(BATCH)]
    flags += ["--max-steps", str(STEPS), "--epochs", "100", "--dtype", "float64", "--no-eval"]
    env = {"MIN_REPLICAS": "2", "HEARTBEAT_TIMEOUT": "1", "TRAIN_FAULT": "kill:1:2"}
    result = run_cmd(
        [str(ROOT / "launch/fault_tolerant.sh"), "2", *flags, "--out-dir", str(tmp_path)],
        timeout=300,  # up to ten torch imports (agents, ranks, the restart, the coordinator)
        env={**env, "NPROC_PER_REPLICA": str(ranks)},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "replica 1: healed from replica 0 at step 2" in log, log
    summaries = [json.loads((tmp_path / f"replica-{i}/summary.json").read_text()) for i in (0, 1)]
    assert summaries[0]["param_checksum"] == summaries[1]["param_checksum"]
    history = summaries[0]["history"]  # [step, epoch, cursor, replicas, quorum id]
    assert [h[3] for h in history] == [2] * STEPS
    expected, steps = reference([2 * ranks] * STEPS, flags)  # slices of B a step
    assert [[*h[:3], h[3] * ranks] for h in history] == steps
    got = torch.load(tmp_path / "replica-0/model.pt", weights_only=True)
    for key, value in expected.items():  # error model: tests/test_training_fault_tolerant.py
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.oracle
def test_ctrl_c_stops_every_replica_at_one_step_and_the_resumed_job_ends_on_the_straight_run(
    tmp_path,
):
    """Three replicas stopped by a Ctrl-C, resumed by two (the membership may change: the
    checkpoint's cursor says where the epoch goes on)."""
    steps = 12
    flags = ["--model", "mlp", "--train-size", "96", "--batch-size", str(BATCH), "--epochs", "100"]
    flags += ["--max-steps", str(steps), "--dtype", "float64", "--no-eval", "--log-every", "1"]
    flags += ["--save-every", "5", "--out-dir", str(tmp_path)]
    script = str(ROOT / "launch/fault_tolerant.sh")
    env = {"HEARTBEAT_TIMEOUT": "1", "GLOO_SOCKET_IFNAME": "lo"}
    deadline = time.monotonic() + 300  # up to twelve torch imports in the two jobs
    job = Live([script, "3", *flags], env={**env, "TRAIN_SLOW": "step:0.2"})  # stopped mid-run
    try:
        assert job.wait_for(r"replica \d: step 3 epoch", deadline), job.output()
        # A terminal's Ctrl-C signals its foreground process group: the script alone here,
        # which passes it on to the ranks and the coordinator (their groups are their own).
        os.killpg(job.proc.pid, signal.SIGINT)
        status = job.finish(deadline)
    finally:
        job.kill()
    log = job.output()
    assert status == 0 and "Traceback" not in log and "SignalException" not in log, log
    # Not by line: two processes' lines can interleave (unbuffered, a line is two writes).
    stops = re.findall(r"replica (\d): stopped by ([^,]+?) after step (\d+), checkpoint", log)
    assert sorted(s[0] for s in stops) == ["0", "1", "2"], log
    assert len({s[2] for s in stops}) == 1, log  # the same step for all
    stopped_at = int(stops[0][2])
    assert 3 <= stopped_at < 10, log
    assert (tmp_path / "checkpoint.pt").resolve().name == f"step-{stopped_at:08d}.pt"
    first = json.loads((tmp_path / "replica-0/summary.json").read_text())["history"]

    done = run_cmd([script, "2", *flags, "--resume", "auto"], timeout=300, env=env)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert log.count(f"at step {stopped_at} (epoch") == 2, log  # both replicas resumed
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert saved[-2:] == ["step-00000010.pt", "step-00000012.pt"], saved  # --save-every, end
    summaries = [json.loads((tmp_path / f"replica-{i}/summary.json").read_text()) for i in (0, 1)]
    assert summaries[0]["param_checksum"] == summaries[1]["param_checksum"]
    history = first + summaries[0]["history"]  # [step, epoch, cursor, replicas, quorum id]
    schedule = [h[3] for h in history]
    assert schedule == [3] * stopped_at + [2] * (steps - stopped_at), history
    expected, reference_steps = reference(schedule, flags)
    assert [h[:4] for h in history] == reference_steps  # every step once, on its samples
    got = torch.load(tmp_path / "replica-0/model.pt", weights_only=True)
    for key, value in expected.items():  # error model: tests/test_training_fault_tolerant.py
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10)
