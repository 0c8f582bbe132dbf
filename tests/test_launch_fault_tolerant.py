"""launch/fault_tolerant.sh runs: the coordinator and two replicas, each its own torchrun. A
replica SIGKILLed after step 2 is restarted by its torchrun (--max-restarts), rejoins the
survivor (which waits for it: --min-replicas 2), is healed from it over the group and the job
ends with both replicas bit-identical and on the trajectory of one process taking 2 x B
samples a step: no step lost, no sample skipped or repeated."""

from __future__ import annotations

import json

import pytest
import torch

from tests.multiproc import ROOT, run_cmd
from tests.test_training_fault_tolerant import BATCH, reference

STEPS = 6


@pytest.mark.slow
@pytest.mark.oracle
def test_a_killed_replica_restarts_rejoins_and_the_run_loses_no_step(tmp_path):
    flags = ["--model", "mlp", "--train-size", "96", "--batch-size", str(BATCH)]
    flags += ["--max-steps", str(STEPS), "--epochs", "100", "--dtype", "float64", "--no-eval"]
    result = run_cmd(
        [str(ROOT / "launch/fault_tolerant.sh"), "2", *flags, "--out-dir", str(tmp_path)],
        timeout=300,  # six torch imports (agents, replicas, the restart, the coordinator)
        env={"MIN_REPLICAS": "2", "HEARTBEAT_TIMEOUT": "1", "TRAIN_FAULT": "kill:1:2"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "replica 1: healed from replica 0 at step 2" in log, log
    summaries = [json.loads((tmp_path / f"replica-{i}/summary.json").read_text()) for i in (0, 1)]
    assert summaries[0]["param_checksum"] == summaries[1]["param_checksum"]
    assert [h[3] for h in summaries[0]["history"]] == [2] * STEPS
    expected, steps = reference([2] * STEPS, flags)
    assert [h[:4] for h in summaries[0]["history"]] == steps
    got = torch.load(tmp_path / "replica-0/model.pt", weights_only=True)
    for key, value in expected.items():  # error model: tests/test_training_fault_tolerant.py
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10)
