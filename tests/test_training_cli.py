"""Checks of flag combinations (training/cli.py validate) that a CPU can reach: the job is a
DistEnv written by hand, here one that computes on a GPU, which nothing below touches."""

from __future__ import annotations

import pytest
import torch

import train_ddp
from core.dist import DistEnv
from core.errors import UsageError
from training.cli import validate

ON_A_GPU = DistEnv(0, 0, 1, 1, "nccl", torch.device("cuda", 0))


def test_local_sgd_and_diloco_refuse_fp16_autocast_and_other_modes_take_it():
    """Per-rank loss scalers would skip different steps between the averages."""
    validate(train_ddp.parse_args(["--sync", "allreduce", "--amp", "fp16"]), ON_A_GPU)
    validate(train_ddp.parse_args(["--sync", "local-sgd", "--amp", "bf16"]), ON_A_GPU)
    for mode in ("local-sgd", "diloco"):
        args = train_ddp.parse_args(["--sync", mode, "--amp", "fp16"])
        with pytest.raises(UsageError, match=f"--sync {mode} cannot use --amp fp16"):
            validate(args, ON_A_GPU)
