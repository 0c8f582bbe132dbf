"""The default recipe learns: benchmarks/learning_check.py on real torchrun worlds.

The full table (seeds 0-9 x 1, 2, 4 ranks x 3 epochs, 30 runs) takes about nine minutes on
two cores: `python -m benchmarks.learning_check`. This test runs a third of it, seeds 0-4 for
two epochs, in about four minutes. Seed 3 is the hardest first epoch at 4 ranks (0.93 at
--lr 0.015); with the issue's 0.05 seed 2 stayed at chance on one rank.
"""

from __future__ import annotations

import csv

import pytest

from tests.multiproc import PYTHON, run_cmd

SEEDS, WORLDS, EPOCHS = range(5), (1, 2, 4), 2


@pytest.mark.slow
@pytest.mark.long  # 15 runs, 4 minutes: CI runs learning_check once, in the docs walk
def test_default_recipe_learns_for_every_seed_and_world(tmp_path):
    out = tmp_path / "learning.csv"
    argv = [PYTHON, "-m", "benchmarks.learning_check", "--epochs", str(EPOCHS), "--out", str(out)]
    argv += ["--seeds", ",".join(map(str, SEEDS)), "--worlds", ",".join(map(str, WORLDS))]
    argv += ["--timeout", "120"]  # per run; about 15 s each on an idle 2-core machine
    result = run_cmd(argv, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr

    n = len(SEEDS) * len(WORLDS)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("every run: torchrun with 1 intra-op thread per rank")
    assert lines[1].startswith("recipe: defaults --lr ")
    assert lines[3] == "world  batch  seed  epoch0  epoch1  max drop      time  result"
    rows = [line.split() for line in lines[4 : 4 + n]]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (w, 32 * w, s) for w in WORLDS for s in SEEDS
    ]
    assert all(r[-1] == "ok" for r in rows), result.stdout
    assert lines[-1] == f"PASS: all {n} runs"

    # The same rows in the CSV, with the criterion checked here again.
    table = list(csv.DictReader(out.open()))
    assert len(table) == n
    for r in table:
        accuracy = [float(r[f"eval_acc_epoch{e}"]) for e in range(EPOCHS)]
        assert accuracy[0] >= 0.90, r
        drops = [accuracy[e - 1] - accuracy[e] for e in range(1, EPOCHS)]
        assert max(drops) <= 0.02 + 1e-9, r
        assert r["result"] == "ok"
