"""The same contract on GPUs with NCCL. Skipped where there are not enough GPUs; where there
are, these must pass (run them on a GPU machine with `pytest tests/test_nccl.py`).

Every GPU process here is a child started with gpus=True (tests/multiproc.py): it sees the
real GPUs and runs with TF32 off (NVIDIA_TF32_OVERRIDE=0), which the first test checks."""

import json

import pytest
import torch

from tests.multiproc import PYTHON, run_cmd, torchrun
from training.checkpoint import load_checkpoint
from training.models import build_model

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

# A matmul (K = 512) and a convolution (K = 16 x 3 x 3) on cuda:0 against float64 on the CPU,
# with PyTorch asking for TF32 on purpose: the override in the child's environment must win.
TF32_PROBE = """
import json, torch, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
g = torch.Generator().manual_seed(0)
a, b = (torch.randn(512, 512, generator=g, dtype=torch.float64) for _ in range(2))
x = torch.randn(8, 16, 32, 32, generator=g, dtype=torch.float64)
w = torch.randn(32, 16, 3, 3, generator=g, dtype=torch.float64)
def error(got, want):
    return ((got.cpu().double() - want).norm() / want.norm()).item()
print(json.dumps({
    "matmul": error(a.float().cuda() @ b.float().cuda(), a @ b),
    "conv": error(F.conv2d(x.float().cuda(), w.float().cuda()), F.conv2d(x, w)),
}))
"""


@pytest.mark.gpu(1)
def test_gpu_children_compute_in_float32_not_tf32():
    """Error model: rounding the float64 inputs to float32 and summing K products in float32
    leaves a relative error (in norm) of a few 2^-24 = 6e-8: 2.4e-7 (matmul) and 2.2e-7
    (conv) measured on CPU. TF32 rounds every input to 10 mantissa bits, 2^-11 = 4.9e-4:
    2.9e-4 for both, emulated on CPU. 3e-6 lies ten times above the first, leaving room for
    other summation orders (split-K matmuls, cuDNN's FFT or Winograd convolutions), and a
    hundred times below the second. On a GPU without TF32 (before Ampere) it passes anyway."""
    result = run_cmd([PYTHON, "-c", TF32_PROBE], gpus=True, check=True, timeout=180)
    errors = json.loads(result.stdout.splitlines()[-1])
    assert errors["matmul"] < 3e-6 and errors["conv"] < 3e-6, errors


@pytest.mark.gpu(1)
def test_one_gpu_nccl_run(tmp_path):
    torchrun(
        [*ARGS, "--batch-size", "24", "--out-dir", str(tmp_path)],
        nproc=1,
        check=True,
        timeout=180,
        gpus=True,
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["backend"], s["world_size"], s["eval_samples"]) == ("nccl", 1, 101)


# Error model, float32 without TF32: the two runs differ only in summation order (12 or 24
# samples per kernel call, cuDNN's algorithm for each shape, NCCL's sum of two ranks), a few
# ulps of a gradient per step. The same comparison on CPU processes with gloo (this model,
# these flags) ends 8e-8 apart after 12 steps. Now and then such a difference flips a max-pool
# or a ReLU between two nearly equal inputs, which moves a weight by about lr x one sample's
# gradient (6e-6 seen in the float32 CPU oracle of test_scripts_train_dp.py). TF32 (on by
# default for
# cuDNN convolutions) moved the runs 8.7e-4 apart: caught. Training moves the weights by 0.14.
TOLERANCE = 1e-4


@pytest.mark.gpu(2)
def test_two_gpus_equal_one_gpu_with_twice_the_batch(tmp_path):
    for nproc, batch, out in ((1, "24", "one"), (2, "12", "two")):
        argv = [*ARGS, "--batch-size", batch, "--out-dir", str(tmp_path / out)]
        torchrun(argv, nproc=nproc, check=True, timeout=180, gpus=True)
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    torch.manual_seed(0)  # the runs' --seed: their initial weights
    init = build_model("cnn", 3, 32, 10).state_dict()
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 100 * TOLERANCE
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=TOLERANCE)
