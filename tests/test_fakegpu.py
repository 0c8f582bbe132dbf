"""The GPU plumbing, checked on any machine: the fake GPUs of tests/fakegpu (which
`make test-fakegpu` runs the suite under) really lie; a child started for a `gpu` test gets
the real CUDA_VISIBLE_DEVICES back with TF32 off, while every other child sees no GPU; the
benchmarks pick a world that runs on 0, 1 or N GPUs."""

import json
import os
import subprocess

import pytest

from benchmarks.bench_dp_ddp import split_evenly
from study.bench import fitting_world
from tests import multiproc
from tests.multiproc import PYTHON, ROOT, count_gpus, gpu_env, run_cmd

FAKEGPU = str(ROOT / "tests" / "fakegpu")

PROBE = """
import json, os, sys
out = {"torch_preloaded": "torch" in sys.modules}
import torch
out["available"], out["count"] = torch.cuda.is_available(), torch.cuda.device_count()
for name, touch in [
    ("tensor", lambda: torch.zeros(1, device="cuda")),
    ("set_device", lambda: torch.cuda.set_device(0)),
    ("synchronize", lambda: torch.cuda.synchronize()),
    ("rng_state", lambda: torch.cuda.get_rng_state()),
    ("dataparallel", lambda: torch.nn.DataParallel(torch.nn.Linear(2, 2))),
]:
    try:
        touch()
        out[name] = "ran"
    except RuntimeError as e:
        out[name] = type(e).__name__ if "touched CUDA" in str(e) else str(e)
for value in ("", "1", "0,1,7", "-1"):
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    out[value] = [torch.cuda.is_available(), torch.cuda.device_count()]
print(json.dumps(out))
"""


def fake_env(gpus: str) -> dict[str, str]:
    env = {**os.environ, "FAKE_GPUS": gpus, "PYTHONPATH": FAKEGPU}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_fake_gpus_lie_and_refuse_to_be_used():
    env = fake_env("2")
    probe = subprocess.Popen(
        [PYTHON, "-c", PROBE], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # Meanwhile: the GPU count behind the `gpu` tests' skips comes from a child with the
    # environment given.
    assert count_gpus({**env, "FAKE_GPUS": "3"}) == 3
    stdout, stderr = probe.communicate(timeout=120)
    assert probe.returncode == 0, stderr.decode()
    out = json.loads(stdout)
    assert out.pop("torch_preloaded") is False  # patched when torch imports it, not before
    assert out == {
        "available": True,
        "count": 2,
        "tensor": "FakeGPUTouched",
        "set_device": "FakeGPUTouched",
        "synchronize": "FakeGPUTouched",
        "rng_state": "FakeGPUTouched",  # torch.cuda.random imported _lazy_init by name
        "dataparallel": "FakeGPUTouched",
        "": [False, 0],  # what the test session sets: no GPU, as real CUDA
        "1": [True, 1],
        "0,1,7": [True, 2],  # device 7 does not exist: the runtime stops there
        "-1": [False, 0],
    }


def test_gpu_children_get_the_real_devices_back_and_tf32_off(monkeypatch):
    # This session hid the GPUs before anything else ran (tests/conftest.py).
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert multiproc._real_visible_devices  # and kept what was there
    monkeypatch.setattr(multiproc, "_real_visible_devices", ["3,1"])
    base = {"CUDA_VISIBLE_DEVICES": "", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "A": "b"}
    env = gpu_env(base)
    assert env == {"CUDA_VISIBLE_DEVICES": "3,1", "NVIDIA_TF32_OVERRIDE": "0", "A": "b"}
    show = [
        "sh",
        "-c",
        'printf \'[%s]\' "${CUDA_VISIBLE_DEVICES-unset}" "${NVIDIA_TF32_OVERRIDE-unset}"',
    ]
    assert run_cmd(show, gpus=True).stdout == "[3,1][0]"
    assert run_cmd(show).stdout == "[][unset]"  # every other child sees no GPU
    monkeypatch.setattr(multiproc, "_real_visible_devices", [None])  # it was unset
    assert "CUDA_VISIBLE_DEVICES" not in gpu_env(base)


def test_benchmarks_pick_a_world_that_fits():
    # (backend, nproc) asked for, GPUs visible -> what runs
    cases = {
        (None, None, 0): ("gloo", 2),
        (None, None, 1): ("gloo", 2),  # one rank per GPU would be a world of one
        (None, None, 3): ("nccl", 3),
        (None, 1, 1): ("nccl", 1),
        (None, 4, 2): ("gloo", 4),  # more ranks than GPUs: NCCL cannot run them
        ("nccl", None, 1): ("nccl", 1),
        ("nccl", None, 0): ("nccl", 1),  # and the rank says nccl needs GPUs
        ("gloo", None, 8): ("gloo", 2),
        ("gloo", 3, 8): ("gloo", 3),
    }
    for (backend, nproc, gpus), world in cases.items():
        assert fitting_world(backend, nproc, gpus) == world, (backend, nproc, gpus)
    assert [split_evenly(64, n) for n in (1, 2, 3, 5, 6, 7, 8)] == [64, 64, 66, 65, 66, 70, 64]


@pytest.mark.slow
def test_bench_on_a_one_gpu_host_runs_two_cpu_ranks(tmp_path):
    """`make bench` on one GPU: study.bench starts 2 gloo ranks, none touches the (fake) GPU."""
    env = {"FAKE_GPUS": "1", "PYTHONPATH": FAKEGPU, "CUDA_VISIBLE_DEVICES": "0"}
    argv = [PYTHON, "-m", "study.bench", "--max-bytes", "4K", "--warmup", "0", "--iters", "1"]
    result = run_cmd([*argv, "--out-dir", str(tmp_path)], env=env, timeout=120, check=True)
    assert "1 GPU(s) visible, starting 2 gloo rank(s) on CPU" in result.stdout
    assert "2 ranks, backend gloo" in result.stdout
    assert (tmp_path / "bench.csv").exists()
