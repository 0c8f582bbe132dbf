"""benchmarks/bench_goals.py runs end to end on 2 gloo ranks (slow: it starts torchrun and
times every goal once, about a minute on a loaded 2-core box)."""

import csv
import types

import pytest
import torch

from benchmarks import bench_goals
from core.dist import DistEnv
from tests.multiproc import PYTHON, run_cmd


def test_rank_local_timings_wait_for_the_gpu(monkeypatch):
    """fastest() on a (pretend) GPU: each round starts on an idle device and its clock is
    read after the last kernel, not after the last launch; on the CPU nothing waits."""
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append("sync"))
    clock = types.SimpleNamespace(perf_counter=lambda: seen.append("clock") or 0.0)
    monkeypatch.setattr(bench_goals, "time", clock)
    monkeypatch.setattr(bench_goals, "slowest", lambda seconds, device: seconds)  # one rank
    gpu = DistEnv(0, 0, 1, 1, "nccl", torch.device("cuda", 0))
    bench_goals.fastest(lambda: seen.append("launch"), 2, gpu)
    assert seen == ["sync", "clock", "launch", "launch", "sync", "clock"] * 5
    seen.clear()
    cpu = DistEnv(0, 0, 1, 1, "gloo", torch.device("cpu"))
    bench_goals.fastest(lambda: seen.append("launch"), 2, cpu)
    assert seen == ["clock", "launch", "launch", "clock"] * 5


@pytest.mark.slow
def test_goals_benchmark_writes_its_table(tmp_path):
    result = run_cmd(
        [PYTHON, "-m", "benchmarks.bench_goals", "--rounds", "1", "--ring-mib", "1"]
        + ["--model", "mlp", "--batch-size", "4", "--steps", "1", "--out-dir", str(tmp_path)],
        timeout=300,
        check=True,
    )
    with open(tmp_path / "bench_goals.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["goal"] for r in rows}) == ["1", "2", "3", "4"]
    assert all(float(r["ratio"]) > 0 for r in rows)
    assert "overlap / ddp" in result.stdout and "loopback" in result.stdout
    assert "median of the rounds' own ratios" in result.stdout  # goal 3's steadier figure
