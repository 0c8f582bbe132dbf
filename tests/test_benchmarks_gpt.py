"""The benchmarks' `--model gpt` path (benchmarks/workload.py) at tiny size: the batch is the
text's windows, the measured bytes of every sharded mode equal their formulas on the gpt
with its tied head, the bucket plan `make bench` relies on, and bench_diloco's curve.

bench_zero's measurement runs on the 4 ranks of tests.comm_world (which the sync tests start
anyway), so it costs no spawn of its own."""

from __future__ import annotations

import argparse
import csv
import math
import random
from pathlib import Path

import pytest
import torch

from benchmarks import bench_diloco, bench_zero
from benchmarks.workload import add_model_flags, model_named, workload
from comm.communicate import plan_buckets_like_ddp
from comm.compress import powersgd_elements
from core.cli import Parser
from core.dist import DistEnv
from core.errors import UsageError
from parallel.overlap import BUCKET_BYTES, FIRST_BUCKET_BYTES
from tests import comm_world
from tests.multiproc import PYTHON, run_cmd
from training.gpt import GPT

CPU = torch.device("cpu")
ORACLE_MODES = ("ddp", "zero1", "zero2", "zero3")  # those with a formula (bench_zero.predicted)
TINY = ["--context", "8", "--gpt-layers", "2", "--gpt-width", "16", "--gpt-heads", "2"]


def text_file(root: Path, name: str = "corpus.txt") -> str:
    """A corpus of 4 KB in which no 8-byte window repeats (text's split keeps its last 10%
    for eval)."""
    path = root / name
    path.write_bytes(bytes(random.Random(0).choices(range(1, 256), k=4096)))  # no NUL: text
    return str(path)


def gpt_args(data: str, *more: str) -> argparse.Namespace:
    p = Parser()
    add_model_flags(p)
    return p.parse_args(["--model", "gpt", *TINY, "--dataset", "text", "--data-dir", data, *more])


def test_gpt_batch_is_windows_of_the_text_each_rank_its_own(tmp_path):
    args = gpt_args(text_file(tmp_path))
    corpus = (tmp_path / "corpus.txt").read_bytes()
    works = [workload(args, 3, rank, 2, CPU) for rank in range(2)]
    starts = set()
    for work in works:
        assert work.x.shape == work.y.shape == (3, 8) and work.x.dtype == torch.int64
        for x, y in zip(work.x.tolist(), work.y.tolist(), strict=True):
            start = corpus.index(bytes(x))  # a window of the file, and its next bytes
            assert bytes(y) == corpus[start + 1 : start + 9]
            starts.add(start)
    assert len(starts) == 6  # no window twice, within a rank or across the two
    model = works[0].build()
    assert isinstance(model, GPT) and model.tok.shape == (256, 16) and model.context == 8
    # One prediction per position, each against the next byte: the mean of the positions'
    # cross-entropies (float32: the two sums differ by rounding, ~1e-7 relative).
    loss = works[0].loss(model)
    log_p = model(works[0].x).log_softmax(-1).gather(-1, works[0].y[..., None])
    assert math.isclose(loss.item(), -log_p.mean().item(), rel_tol=1e-5)
    # At GPT-2's init a logit is LN(h) . tok[v]: |LN(h)| = sqrt(16), tok ~ N(0, 0.02^2), so
    # logits ~ N(0, 0.08^2) and the loss is ln 256 to within a few 0.08 (6 sigma: 0.5).
    assert abs(loss.item() - math.log(256)) < 0.5


def test_image_models_keep_their_random_batch_and_refuse_text_flags(tmp_path):
    p = Parser()
    add_model_flags(p)
    work = workload(p.parse_args([]), 4, 0, 2, CPU)
    assert work.x.shape == (4, 3, 32, 32) and work.y.shape == (4,)
    assert work.build()(work.x).shape == (4, 10)
    with pytest.raises(UsageError, match="--model gpt's text"):
        workload(p.parse_args(["--dataset", "stdlib"]), 4, 0, 2, CPU)
    with pytest.raises(UsageError, match="fewer than --batch-size 1000"):
        workload(gpt_args(text_file(tmp_path)), 1000, 0, 2, CPU)


def test_make_bench_gpt_has_buckets_to_overlap():
    """The Makefile's gpt rows: `make gpt`'s model (4 blocks of width 128, context 128, 3.4 MB
    of float32 gradients) in DDP's default buckets (a first of 1 MiB, then up to 25 MiB) is 2
    buckets, the second 2.3 MB that only the end of backward fills; with --bucket-cap-mb 1 it
    is 4, and the last, which nothing can hide, holds only the embeddings (0.2 MB). Planned
    by DDP's rule (overlap's plan; the ready order puts the embeddings last either way)."""
    p = Parser()
    add_model_flags(p)
    params = list(model_named("gpt", p.parse_args([])).parameters())[::-1]

    def buckets(cap: int) -> list[int]:
        plan = plan_buckets_like_ddp(params, cap, FIRST_BUCKET_BYTES)
        return [sum(params[i].numel() * 4 for i in bucket) for bucket in plan]

    assert buckets(BUCKET_BYTES) == [1_056_768, 2_313_216]
    assert buckets(2**20) == [1_056_768, 1_057_280, 1_058_304, 197_632]


def test_diloco_curve_sets_each_log_step_against_the_bytes_so_far():
    run = {
        "comm": {"sent_per_rank_per_step": [10e6, 1e6, 10e6, 1e6]},
        "train_loss": [(2, 5.0), (4, 4.5)],
    }
    assert bench_diloco.curve(run) == [(2, 11.0, 5.0), (4, 22.0, 4.5)]


def bench_checks(rank: int, world_size: int, out_root: str) -> list[dict]:
    """Runs on every rank of tests.comm_world: bench_zero's measurement of the tiny gpt."""
    data = text_file(Path(out_root), f"corpus-{rank}.txt")
    args = bench_zero.parse_args(
        ["--model", "gpt", *TINY, "--dataset", "text", "--data-dir", data, "--batch-size", "2"]
        + ["--rounds", "1", "--steps", "1", "--warmup", "1", "--modes", *ORACLE_MODES]
    )
    env = DistEnv(rank, rank, world_size, world_size, "gloo", CPU)
    work = workload(args, 2, rank, world_size, CPU)
    return [
        {k: r[k] for k in ("mode", "params", "grads", "optimizer", "sent", "peak", "predicted")}
        for r in bench_zero.measure(args, env, work)
    ]


@pytest.mark.slow  # 4 ranks, every mode: 8 s
def test_bench_zero_on_the_gpt_measures_what_the_formulas_say():
    """4 ranks: for ddp and the hand-made zero1/2/3 (torch-zero1 and fsdp2 have no formula
    to hold them to, and run in bench_zero's slow test) the bytes a rank holds and sends equal
    parallel/memory.py's formulas byte for byte on the gpt, tied head included (one tensor,
    counted once), and every mode's measured peak holds at least what the rank keeps."""
    rows = {r["mode"]: r for r in comm_world.results()[0]["bench"]}
    assert list(rows) == list(ORACLE_MODES)
    for mode, row in rows.items():
        pred = row["predicted"]
        for kind in bench_zero.KINDS:
            assert row[kind] == pred[kind] * pred["element"], (mode, kind)
        assert math.isclose(row["sent"], pred["sent"] * pred["element"], rel_tol=1e-12)
        assert row["peak"] >= sum(row[k] for k in bench_zero.KINDS), mode


@pytest.mark.slow
def test_bench_sync_and_compress_sync_run_the_gpt(tmp_path):
    """bench_sync and bench_compress_sync end to end on 2 ranks with --model gpt: every mode's
    row, the buckets overlap launched (DDP's rule at the cap given), and compression's bytes
    against the gpt's 4 P bytes of float32 gradients and PowerSGD's formula."""
    data = text_file(tmp_path)
    gpt = [*TINY, "--dataset", "text", "--data-dir", data]
    run_cmd(
        [PYTHON, "-m", "benchmarks.bench_sync", "--model", "gpt", *gpt, "--batch-size", "2"]
        + ["--bucket-cap-mb", "0.01", "--rounds", "1", "--steps", "1", "--warmup", "1"]
        + ["--layers", "2", "--out-dir", str(tmp_path)],
        timeout=300,
        check=True,
    )
    with open(tmp_path / "bench_sync.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["section"] == "sync step"]
    assert [r["variant"] for r in rows] == [
        "none", "ddp", "allreduce", "overlap", "local-sgd K=4", "diloco K=4",
    ]  # fmt: skip
    p = Parser()
    add_model_flags(p)
    params = list(model_named("gpt", p.parse_args(TINY)).parameters())[::-1]
    cap = int(0.01 * 2**20)
    planned = len(plan_buckets_like_ddp(params, cap, cap))
    assert planned > 2 and {int(r["buckets"]) for r in rows} == {planned}
    out = run_cmd(
        [PYTHON, "-m", "benchmarks.bench_compress_sync", "--models", "gpt", *TINY, "--ranks", "1"]
        + ["--steps", "1", "--rounds", "1"],
        timeout=300,
        check=True,
    ).stdout
    sent = {
        line.split()[1]: int(line.split()[2]) for line in out.splitlines() if line[:4] == "gpt "
    }
    full = 4 * sum(q.numel() for q in params)
    assert sent["none"] == full and sent["bf16"] == sent["fp16"] == full // 2
    # PowerSGD's bytes, exactly: (n + m) r per compressed matrix, the rest as they are.
    assert sent["powersgd-r1"] == 4 * powersgd_elements([q.shape for q in params], 1) < full // 8


@pytest.mark.slow
def test_bench_zero_on_the_gpt_at_3_ranks(tmp_path):
    """The formulas at W = 3, which divides neither the tiny gpt's P = 10,816 nor all of its
    units: the padded flat buffers and slices, byte for byte, from the benchmark's CSV."""
    run_cmd(
        [PYTHON, "-m", "benchmarks.bench_zero", "--nproc", "3", "--model", "gpt", *TINY]
        + ["--dataset", "text", "--data-dir", text_file(tmp_path), "--batch-size", "2"]
        + ["--rounds", "1", "--steps", "1", "--warmup", "1", "--modes", *ORACLE_MODES]
        + ["--out-dir", str(tmp_path)],
        timeout=300,
        check=True,
    )
    with open(tmp_path / "bench_zero.csv", newline="") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(ORACLE_MODES)
    for mode, row in rows.items():
        assert int(row["parameters"]) == 10_816 and int(row["world_size"]) == 3
        for kind in bench_zero.KINDS:
            assert float(row[kind]) == float(row[f"predicted_{kind}"]), (mode, kind)
        assert math.isclose(float(row["sent"]), float(row["predicted_sent"]), rel_tol=1e-12)
        assert int(row["peak"]) >= sum(int(row[k]) for k in bench_zero.KINDS), mode
