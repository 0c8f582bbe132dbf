"""The same contract on GPUs with NCCL. Skipped where there are not enough GPUs; where there
are, these must pass (run them on a GPU machine with `pytest tests/test_nccl.py`)."""

import json

import pytest
import torch

from tests.multiproc import torchrun
from training.checkpoint import load_checkpoint

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ARGS = [
    "train_ddp.py",
    "--train-size",
    "480",
    "--eval-size",
    "101",
    "--max-steps",
    "12",
    "--epochs",
    "1",
    "--log-every",
    "4",
]


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_one_gpu_nccl_run(tmp_path):
    torchrun(
        [*ARGS, "--batch-size", "24", "--out-dir", str(tmp_path)], nproc=1, check=True, timeout=180
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["backend"], s["world_size"], s["eval_samples"]) == ("nccl", 1, 101)


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_equal_one_gpu_with_twice_the_batch(tmp_path):
    torchrun(
        [*ARGS, "--batch-size", "24", "--out-dir", str(tmp_path / "one")],
        nproc=1,
        check=True,
        timeout=180,
    )
    torchrun(
        [*ARGS, "--batch-size", "12", "--out-dir", str(tmp_path / "two")],
        nproc=2,
        check=True,
        timeout=180,
    )
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    for key in one:  # cuDNN/cuBLAS reduction orders differ a little more than on CPU
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
