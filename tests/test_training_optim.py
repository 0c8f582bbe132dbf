"""--optimizer sgd|adamw: built from the flags, and part of a run's trajectory on resume."""

from pathlib import Path

import pytest
import torch

import train_dp
from core.errors import run_cli
from training.checkpoint import CheckpointError, check_resumable, load_checkpoint
from training.optim import make_optimizer

FLAGS = [
    "--train-size", "64", "--eval-size", "4", "--batch-size", "16", "--epochs", "1",
    "--max-steps", "2", "--no-eval", "--dtype", "float64", "--model", "mlp",
]  # fmt: skip


def test_adamw_gets_its_flags():
    args = train_dp.parse_args(
        ["--optimizer", "adamw", "--betas", "0.8", "0.99", "--eps", "1e-6", "--lr", "0.5"]
    )
    opt = make_optimizer(torch.nn.Linear(2, 2), args)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.5, (0.8, 0.99), 1e-6)
    assert isinstance(
        make_optimizer(torch.nn.Linear(2, 2), train_dp.parse_args([])), torch.optim.SGD
    )


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path: Path, capsys):
    out = tmp_path / "run"
    train_dp.main([*FLAGS, "--optimizer", "adamw", "--out-dir", str(out), "--gpus", "none"])
    state = load_checkpoint(out / "checkpoint.pt")
    # Two moments per parameter tensor: what the sharded modes divide by the world size.
    assert all(
        set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state["optimizer"]["state"].values()
    )
    sgd = train_dp.parse_args([*FLAGS])
    with pytest.raises(CheckpointError, match=r"written with --optimizer adamw \(this run: sgd\)"):
        check_resumable(state, sgd, 1, out / "checkpoint.pt")
    other_betas = train_dp.parse_args([*FLAGS, "--optimizer", "adamw", "--betas", "0.5", "0.9"])
    with pytest.raises(CheckpointError, match=r"--betas \[0.9, 0.999\] \(this run: \[0.5, 0.9\]\)"):
        check_resumable(state, other_betas, 1, out / "checkpoint.pt")
    capsys.readouterr()
    code = run_cli(train_dp.main, [*FLAGS, "--optimizer", "adamw", "--betas", "1.5", "0.9"])
    assert code == 2 and "must be in [0, 1), got 1.5" in capsys.readouterr().err
