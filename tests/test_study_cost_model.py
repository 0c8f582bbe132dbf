"""The alpha-beta cost model (study/cost_model.py): the fit against synthetic data with a known
answer, the formulas against hand computation, and the CLI's one-line errors. No ranks."""

from __future__ import annotations

import csv
import json
import math

import pytest

from core.errors import run_cli
from study import bench
from study import cost_model as model


def _write_bench(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench.COLUMNS)
        writer.writeheader()
        for op, nbytes, world, seconds in rows:
            writer.writerow(
                {"op": op, "bytes": nbytes, "count": nbytes // 4, "world_size": world}
                | {"backend": "gloo", "time_us": seconds * 1e6, "algbw_gbs": 0, "busbw_gbs": 0}
            )


SIZES = [2**k for k in range(10, 25, 2)]  # 1K ... 16M


def test_fit_recovers_alpha_and_beta_from_exact_lines():
    # Exact data: the closed-form normal equations give alpha and beta back up to the
    # rounding of a 2x2 solve over sums of ~8 terms spanning 1e-4..1e0 (weights 1/t^2 up to
    # 1e8): relative error ~1e-13; 1e-9 leaves ample room and is far below any real bias.
    alpha, beta = 250e-6, 1 / 0.8e9
    f = model.fit_line(SIZES, [alpha + beta * n for n in SIZES])
    assert f.alpha == pytest.approx(alpha, rel=1e-9)
    assert f.beta == pytest.approx(beta, rel=1e-9)
    assert f.gbps == pytest.approx(0.8, rel=1e-9)
    assert f.r2 == pytest.approx(1.0, abs=1e-12)


def test_link_fit_recovers_the_link_through_the_formulas(tmp_path):
    alpha, beta = 80e-6, 1 / 2e9
    rows = [
        (f"{algo}_all_reduce", n, 6, model.predict(algo, 6, n, alpha, beta))
        for algo in model.ALGORITHMS
        for n in SIZES
    ]
    _write_bench(tmp_path / "b.csv", rows)
    parsed = model.read_bench(tmp_path / "b.csv")
    link = model.fit_link(parsed, 6)
    # time_us is written with Python's repr (17 digits): exact to ~1e-16 before the solve.
    assert link.alpha == pytest.approx(alpha, rel=1e-9)
    assert link.beta == pytest.approx(beta, rel=1e-9)
    # Data that follows the formulas: both ways of predicting pick the fastest every time.
    # At 6 ranks rhd (fewest messages) wins small sizes and the ring large ones.
    picks = model.pick(parsed, 6)
    assert all(r["textbook_pick"] == r["own_lines_pick"] == r["fastest"] for r in picks)
    assert {r["fastest"] for r in picks} == {"rhd", "ring"}
    fits = model.fit_bench(parsed)
    # Each algorithm's own line is A alpha + B beta n: intercept A alpha, slope B beta.
    a, b = model.terms("tree", 6)
    assert fits[("tree_all_reduce", 6, "gloo")].alpha == pytest.approx(a * alpha, rel=1e-9)
    assert fits[("tree_all_reduce", 6, "gloo")].beta == pytest.approx(b * beta, rel=1e-9)


@pytest.mark.parametrize(
    "algo, world, expect",
    [
        # 8 ranks, 1 MB, alpha 5 us, 25 GB/s (beta n = 40 us), by hand:
        ("ring", 8, 14 * 5 + 2 * 7 / 8 * 40),  # 2(p-1) alpha + 2(p-1)/p n beta = 140 us
        ("tree", 8, 2 * 3 * (5 + 40)),  # 2 lg p (alpha + n beta) = 270 us
        ("rhd", 8, 2 * 3 * 5 + 2 * 7 / 8 * 40),  # 2 lg p alpha + 2(p-1)/p n beta = 100 us
        ("naive", 8, 2 * 7 * (5 + 40)),  # 2(p-1)(alpha + n beta) = 630 us
        # 6 ranks: p' = 4, ceil(lg 6) = 3
        ("rhd", 6, 2 * 2 * 5 + 2 * 3 / 4 * 40 + 2 * (5 + 40)),  # + the fold: 170 us
        ("tree", 6, 2 * 3 * (5 + 40)),
        ("ring", 1, 0.0),
    ],
)
def test_predict_matches_the_formulas_by_hand(algo, world, expect, capsys):
    seconds = model.predict(algo, world, 1e6, 5e-6, 1 / 25e9)
    assert seconds * 1e6 == pytest.approx(expect, rel=1e-12)
    if world > 1:
        argv = ["predict", "--algo", algo, "--world", str(world), "--bytes", "1000000"]
        assert run_cli(model.main, argv) == 0
        assert f"= {expect:.1f} us" in capsys.readouterr().out


def test_crossover_is_where_ring_and_tree_meet():
    alpha, beta = 5e-6, 1 / 25e9
    for p in (8, 64, 1024):
        n = model.crossover(p, "tree", alpha, beta)
        assert model.predict("tree", p, n, alpha, beta) == pytest.approx(
            model.predict("ring", p, n, alpha, beta), rel=1e-12
        )
    assert model.crossover(4, "rhd", alpha, beta) == math.inf  # fewer messages, same bytes
    assert model.crossover(4, "naive", alpha, beta) == 0.0  # as many messages, more bytes


def test_exposed_communication_of_one_bucket_is_its_whole_all_reduce():
    # One bucket, ready only when backward ends: nothing overlaps, all of it is exposed.
    alpha, beta = 5e-6, 1 / 25e9
    exposed = model.exposed_seconds(4e6, 8e6, 0.01, "ring", 16, alpha, beta)
    assert exposed == pytest.approx(model.predict("ring", 16, 4e6, alpha, beta), rel=1e-12)
    # Many small buckets during a long backward: only the last bucket is left.
    exposed = model.exposed_seconds(4e6, 1e6, 1.0, "ring", 16, alpha, beta)
    assert exposed == pytest.approx(model.predict("ring", 16, 1e6, alpha, beta), rel=1e-12)


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "cannot read"),
        ("a,b\n1,2\n", "is not a study.bench CSV"),
        ("op,bytes,world_size,backend,time_us\nring_all_reduce,lots,4,gloo,1\n", "line 2"),
        ("op,bytes,world_size,backend,time_us\nring_all_reduce,4096,4,gloo,-1\n", "line 2"),
        ("op,bytes,world_size,backend,time_us\n", "no measurements"),
        (b"\xff\xfe\x00garbage", "not a CSV"),
    ],
)
def test_cli_errors_in_one_line_on_a_bad_csv(tmp_path, capsys, content, says):
    path = tmp_path / "bench.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    for argv in (["fit", str(path)], ["pick", str(path)]):
        assert run_cli(model.main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_cli_errors_on_bad_flags_and_runs(tmp_path, capsys):
    _write_bench(tmp_path / "b.csv", [("all_reduce", n, 2, 1e-3 + n * 1e-9) for n in SIZES])
    cases = [
        ["predict", "--algo", "ring", "--world", "0", "--bytes", "1M"],
        ["predict", "--algo", "ring", "--world", "4", "--bytes", "lots"],
        ["predict", "--algo", "ring", "--world", "4", "--bytes", "1M", "--gbps", "0"],
        ["predict", "--op", "broadcast", "--world", "4", "--bytes", "1M"],
        ["pick", str(tmp_path / "b.csv")],  # no hand-made algorithm in it
        ["ddp", str(tmp_path / "b.csv"), str(tmp_path / "no-run")],
    ]
    for argv in cases:
        assert run_cli(model.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)


def test_ddp_compares_the_traced_steps(tmp_path, capsys):
    """`ddp` reads the gradient-only steps of a timeline (not the first, not one with a
    metric reduction; without the preemption check that ends each step) and divides their
    median by alpha + beta x bytes, over every rank and for the last rank to arrive (the
    smallest time of each step)."""
    alpha, beta = 1e-3, 1e-9
    _write_bench(tmp_path / "b.csv", [("all_reduce", n, 2, alpha + beta * n) for n in SIZES])
    run = tmp_path / "run"
    (run / "timeline").mkdir(parents=True)
    grad = 1_000_000
    summary = {"world_size": 2, "comm": {"model_grad_bytes": grad}}
    (run / "summary.json").write_text(json.dumps(summary))
    want = alpha + beta * grad
    for r, k in ((0, 2), (1, 3)):  # rank 1 waits longer: it arrived first
        steps = [{"comm": [{"bytes": grad, "seconds": 9.0}]}]  # warm-up, left out
        check = {"name": "all_reduce", "bytes": 4, "seconds": 5.0}  # preemption's, left out
        steps += [{"comm": [{"bytes": grad, "seconds": k * want}, check]}] * 2
        steps += [{"comm": [{"bytes": grad, "seconds": 7.0}, {"bytes": 24, "seconds": 1.0}]}]
        (run / "timeline" / f"rank{r}.json").write_text(json.dumps({"steps": steps}))
    ratios = model.main(["ddp", str(tmp_path / "b.csv"), str(run)])
    # Exact lines: the fit on all sizes and the one near the bucket agree.
    for fit in ("all sizes", "sizes within 4x"):
        assert ratios[fit]["every_rank"] == pytest.approx(2.5, rel=1e-9)
        assert ratios[fit]["last_rank"] == pytest.approx(2.0, rel=1e-9)
    assert "every rank 2.50, last rank 2.00" in capsys.readouterr().out
