"""benchmarks/bench_goals.py runs end to end on 2 gloo ranks (slow: it starts torchrun and
times every goal once, about a minute on a loaded 2-core box)."""

import csv

import pytest

from tests.multiproc import PYTHON, run_cmd


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
