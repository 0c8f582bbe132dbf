"""launch/fault_tolerant.sh runs: the coordinator and two replicas, each its own torchrun of one
rank, then of two. A replica SIGKILLed after step 2 (every rank of it: a lost node) is
restarted by its torchrun (--max-restarts), rejoins the survivor (which waits for it:
--min-replicas 2), is healed from it over the groups, and the job ends with both replicas
bit-identical and on the trajectory of one process taking all 2 x R x B samples of a step: no
step lost, no sample skipped or repeated."""

from __future__ import annotations

import json

import pytest
import torch

from tests.multiproc import ROOT, run_cmd
from tests.test_training_fault_tolerant import BATCH, reference

STEPS = 6


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
