"""A stalled rank is named, on rank 0's stderr and in torchrun's report, within
--stall-timeout (plus about two seconds), not after the process group's --timeout and not as
the healthy rank that waited for it (training/heartbeat.py)."""

import time

import pytest

from tests.multiproc import torchrun
from training.checkpoint import load_checkpoint

# 8 steps per epoch on 2 ranks; a checkpoint and a log line every step before the stall, so
# the watch also sees saves and log reductions pass without an alarm.
JOB = ["train_ddp.py", "--model", "mlp", "--train-size", "64", "--eval-size", "16",
       "--batch-size", "4", "--epochs", "2", "--save-every", "1", "--log-every", "1"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stalled", [1, 0])
def test_a_stalled_rank_is_named_within_the_stall_timeout(tmp_path, stalled):
    start = time.monotonic()
    hung = torchrun(
        [*JOB, "--timeout", "300", "--stall-timeout", "5", "--out-dir", str(tmp_path)],
        env={"TRAIN_FAULT": f"hang:{stalled}:3"},  # stops answering in step 3, after its save
        timeout=150,
    )
    elapsed = time.monotonic() - start
    assert hung.returncode != 0
    line = (
        f"error: stalled: rank {stalled} in step 3 made no progress for 5 s while rank(s) "
        f"{1 - stalled} waited for it (--stall-timeout 5)"
    )
    assert hung.stderr.count(line) >= 2, hung.stderr[-3000:]  # rank 0's, and the report's
    # torchrun's report: whichever rank it names first (every rank ends at the verdict), the
    # root cause carries the line that names the stalled rank, not a traceback.
    root = hung.stderr[hung.stderr.index("Root Cause") :]
    assert "exitcode  : 1" in root and line in root, root
    assert "Traceback" not in root.split("Other Failures")[0], root
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert elapsed < 60 + 30, elapsed  # start-up of both ranks (slow under load) + 5 s stall
