"""benchmarks/stress_exit.py's jobs: each train_ddp.py run passes train_ddp.py's own checks on
its 2 ranks, so that a run counted ok or aborted is a run that trained, and a job never fails
on every run for a missing flag (as the hsdp modes did without --topology)."""

from __future__ import annotations

import torch

import train_ddp
from benchmarks.stress_exit import jobs
from core.dist import DistEnv
from parallel.factory import SYNC_MODES
from training.cli import validate

TWO_CPU_RANKS = DistEnv(0, 0, 2, 2, "gloo", torch.device("cpu"))  # stress_exit's torchrun


def test_every_train_ddp_job_is_a_valid_two_rank_run():
    runs = [job for job in jobs() if job.args[0] == "train_ddp.py"]
    assert sorted(job.args[job.args.index("--sync") + 1] for job in runs) == sorted(SYNC_MODES)
    for job in runs:
        validate(train_ddp.parse_args(list(job.args[1:])), TWO_CPU_RANKS)  # no UsageError
