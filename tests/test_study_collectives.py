"""The communication study against closed forms: the collectives tour, the hand-made ring and
naive all-reduce, the tracer (direct collectives and a DDP training run), the profiler trace
and the benchmark.

Spawning ranks is the expensive part, so ONE world of 4 ranks is spawned for the module and
every test reads its share of the results; the ring runs there at 2 and 3 ranks too, in
subgroups. The tour at 2 ranks is checked through a real torchrun of `-m study.collectives`.
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.distributed.run import get_args_parser

from comm.compat import all_gather_single, reduce_scatter_single
from comm.ring import (
    chunk_bounds,
    naive_all_reduce,
    naive_bytes_sent_by_rank,
    ring_all_reduce,
    ring_bytes_sent_by_rank,
    segment_count,
)
from comm.tracer import CommTracer, make_profiler
from core.dist import distributed
from core.errors import UsageError
from study import bench, collectives, timeline
from tests.multiproc import run_world, torchrun

# Sizes 1..10^5, odd and even, below and above the world sizes, divisible by W and not.
RING_SIZES = [1, 2, 3, 4, 5, 6, 7, 11, 12, 64, 97, 1000, 4099, 65536, 99999, 100000]
BENCH_OPS = ["all_reduce", "ring_all_reduce", "all_gather", "reduce_scatter", "broadcast"]
BENCH_SIZES = [4096, 65536]
W = 4  # the spawned world
RING_WORLDS = (2, 3, 4)
TRAIN_STEPS, LOG_EVERY = 5, 2


# ---- what the ranks run ------------------------------------------------------------------


def _ring_checks(rank: int, group: dist.ProcessGroup | None) -> list[dict]:
    """The ring and the naive all-reduce against dist.all_reduce, in `group`."""
    out = []
    world_size = dist.get_world_size(group)
    for n in RING_SIZES:
        g = torch.Generator().manual_seed(1000 * n + rank)
        exact = torch.randint(-1000, 1000, (n,), generator=g).float()  # sums are exact
        # Error model for "close": each element sums W <= 4 standard-normal float64 values
        # (|x| < 6) in another order than gloo: at most 3 roundings of 24 u (u = 1.1e-16),
        # < 1e-14; 1e-12 leaves 100x, and a chunk added twice or not at all is off by ~1.
        noisy = torch.randn(n, generator=g, dtype=torch.float64)
        checks = {"n": n}
        variants = [("ring", ring_all_reduce), ("naive", naive_all_reduce)]
        # The pipelined ring with many segments per chunk: 1 KiB, and 3 elements (up to
        # ~100 segments per chunk, so the sizes stay small there).
        variants.append(("ring-1k", functools.partial(ring_all_reduce, segment_bytes=1024)))
        if n <= 1000:
            variants.append(("ring-3el", functools.partial(ring_all_reduce, segment_bytes=12)))
        for name, fn in variants:
            want, got = exact.clone(), exact.clone()
            dist.all_reduce(want, group=group)
            traffic = fn(got, group=group)
            want_f, got_f = noisy.clone(), noisy.clone()
            dist.all_reduce(want_f, group=group)
            fn(got_f, group=group)
            checks[name] = {
                "equal": torch.equal(got, want),
                "close": torch.allclose(got_f, want_f, rtol=1e-12, atol=1e-12),
                "sent": traffic.sent,
                "received": traffic.received,
            }
        out.append(checks)
    # A non-contiguous 2-D tensor is reduced in place too.
    t = torch.arange(12.0).view(3, 4).t() * (rank + 1)
    ring_all_reduce(t, group=group)
    total = world_size * (world_size + 1) / 2
    out.append({"noncontiguous": torch.equal(t, torch.arange(12.0).view(3, 4).t() * total)})
    return out


def _traced_collectives(rank: int, world_size: int) -> dict:
    """Known collectives under the tracer, each with its analytic payload."""
    original = dist.all_reduce
    with CommTracer() as tracer:
        dist.all_reduce(torch.ones(1000))  # 4000 B
        dist.broadcast(torch.ones(10, dtype=torch.float64), src=0)  # 80 B
        all_gather_single(torch.empty(2 * world_size), torch.ones(2))  # output 8W B
        reduce_scatter_single(torch.empty(3), torch.ones(3 * world_size))  # input 12W B
        dist.all_reduce(torch.ones(8), async_op=True).wait()  # 32 B, timed to completion
        ring_all_reduce(torch.ones(10))  # batched isend/irecv: exactly what the ring sends
        dist.barrier()
        step = tracer.end_step()
    # Outside the context manager nothing is recorded and the originals are back.
    dist.all_reduce(torch.ones(1))
    return {
        "events": [(e.name, e.bytes, e.sent) for e in tracer.events],
        "step": step,
        "restored": dist.all_reduce is original and len(tracer.events) == 6 + 2 * (world_size - 1),
    }


def _profile_overlap(rank: int, out_dir: str) -> None:
    """Five steps of a DDP model with several buckets under make_profiler. DDP's first bucket
    holds about 1 MiB (four of these layers); the other four get one bucket each and their
    backward runs while the first bucket is being all-reduced."""
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(256, 256), nn.ReLU())]
    model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers), bucket_cap_mb=0.26)
    x = torch.randn(256, 256)
    profiler = make_profiler(Path(out_dir), rank, enabled=True)
    profiler.start()
    for _ in range(5):
        model(x).square().mean().backward()
        profiler.step()
    profiler.stop()


def _world(rank: int, world_size: int, tmp: str) -> dict:
    import train_ddp

    with distributed("gloo") as env:
        result = {"tour": collectives.tour(env)}
        result["fallback"] = collectives.tour(
            env,
            ["all_reduce", "reduce_scatter", "all_to_all"],
            missing={"AVG", "reduce_scatter", "all_to_all"},
        )
        result["ring"] = {}
        for w in RING_WORLDS:
            group = dist.new_group(list(range(w)))  # every rank takes part in creating it
            if rank < w:
                result["ring"][w] = _ring_checks(rank, group)
        result["traced"] = _traced_collectives(rank, world_size)
        result["train"] = train_ddp.main(
            [
                "--model=mlp",
                "--train-size=512",
                "--batch-size=16",
                "--epochs=1",
                f"--max-steps={TRAIN_STEPS}",
                f"--log-every={LOG_EVERY}",
                "--no-eval",
                "--trace-comm",
                "--profile",
                f"--out-dir={tmp}/train",
            ]
        )
        _profile_overlap(rank, f"{tmp}/overlap")
        result["bench"] = bench.run(env, BENCH_OPS, BENCH_SIZES, 1, 2, Path(tmp) / "bench")
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("comm")
    return run_world(_world, W, str(tmp), timeout=180), tmp


# ---- the tour -------------------------------------------------------------------------------


def _check_tour(tour: dict, r: int, w: int) -> None:
    total = w * (w + 1) / 2
    assert tour["broadcast"] == [1.0, 1.0]
    assert tour["reduce"] == ([total, total] if r == 0 else None)
    assert tour["all_reduce"] == {
        "SUM": [total] * 2,
        "MAX": [float(w)] * 2,
        "AVG": [total / w] * 2,
    }
    assert tour["gather"] == ([float(i + 1) for i in range(w)] if r == 0 else None)
    assert tour["scatter"] == [2.0 * r, 2.0 * r + 1]
    expected_rows = [[10.0 * i, 10.0 * i + 1] for i in range(w)]
    assert tour["all_gather"] == {"list": expected_rows, "single": sum(expected_rows, [])}
    # rank i holds 10i + j at position j; element r of the sum is sum_i (10i + r)
    assert tour["reduce_scatter"] == [10.0 * w * (w - 1) / 2 + w * r]
    assert tour["all_to_all"] == [10.0 * i + r for i in range(w)]
    assert tour["barrier"] >= 0.9 * 0.05 * (w - 1)  # nobody left before the last arrived
    left = (r - 1) % w + 1.0
    assert tour["send_recv"] == {"send_recv": left, "isend_irecv": left}
    assert tour["objects"] == {
        "all_gather": [{"rank": i, "word": "x" * (i + 1)} for i in range(w)],
        "broadcast": {"lr": 0.1, "from": 0},
        "scatter": f"card {r}",
    }


@pytest.mark.oracle
def test_tour_results_are_the_closed_forms(world):
    results, _ = world
    for r, result in enumerate(results):
        _check_tour(result["tour"], r, W)


@pytest.mark.oracle
def test_tour_fallbacks_give_the_same_results(world):
    results, _ = world
    for result in results:
        assert result["fallback"] == {k: result["tour"][k] for k in result["fallback"]}


@pytest.mark.oracle
@pytest.mark.slow  # torchrun with 4 ranks: 5 s
def test_collectives_under_torchrun():
    proc = torchrun(["-m", "study.collectives"], nproc=2, timeout=90)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # rank 0 prints every rank's row, in rank order, once
    for line in (
        "rank 0  [1, 1]  ->  [3, 3]",
        "rank 1  [2, 2]  ->  [3, 3]",
        "rank 0  [0, 1]    ->  [0, 1, 10, 11]",
        "rank 1  [10, 11]  ->  [1, 11]",  # all_to_all: the transpose
        "rank 0  [1]  ->  [2]",  # send/recv around the ring
        "rank 1  (none)  ->  ['card 1']",  # scatter_object_list: rank 1 passes nothing
        "rank 1  [2, 2]  ->  (undefined)",  # reduce(dst=0): rank 1's buffer is scratch
    ):
        assert line in out, line
    assert out.count("== all_reduce(SUM)") == 1
    assert out.index("rank 0  [1, 1]  ->  [3, 3]") < out.index("rank 1  [2, 2]  ->  [3, 3]")
    for name in collectives.DEMOS:
        assert f"== {name}" in out or name in ("send_recv", "objects")


def test_tour_rejects_unknown_demo():
    with pytest.raises(UsageError, match="--only"):
        collectives.main(["--only", "nope"])


# ---- ring and naive all-reduce ------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("w", RING_WORLDS)
def test_ring_and_naive_equal_dist_all_reduce(world, w):
    results, _ = world
    for r, result in enumerate(results):
        if r >= w:
            assert w not in result["ring"]  # not in the subgroup: did not take part
            continue
        *sizes, last = result["ring"][w]
        assert last == {"noncontiguous": True}
        assert [c["n"] for c in sizes] == RING_SIZES
        for c in sizes:
            names = ["ring", "naive", "ring-1k"] + (["ring-3el"] if c["n"] <= 1000 else [])
            assert sorted(k for k in c if k != "n") == sorted(names)
            for name in names:
                assert c[name]["equal"] and c[name]["close"], (name, c["n"])


@pytest.mark.parametrize("w", RING_WORLDS)
def test_ring_bytes_match_theory(world, w):
    results, _ = world
    per_rank = [results[r]["ring"][w] for r in range(w)]
    for i, n in enumerate(RING_SIZES):
        ring_sent = [per_rank[r][i]["ring"]["sent"] for r in range(w)]
        assert ring_sent == ring_bytes_sent_by_rank(n, 4, w)
        # Segments change how the bytes are cut, never how many cross the wire.
        for name in ["ring-1k"] + (["ring-3el"] if n <= 1000 else []):
            assert [per_rank[r][i][name]["sent"] for r in range(w)] == ring_sent, name
            assert [per_rank[r][i][name]["received"] for r in range(w)] == [
                per_rank[r][i]["ring"]["received"] for r in range(w)
            ], name
        # every chunk crosses W-1 links in each phase: 2(W-1) tensors in all
        assert sum(ring_sent) == 2 * (w - 1) * n * 4
        assert sum(per_rank[r][i]["ring"]["received"] for r in range(w)) == sum(ring_sent)
        if n % w == 0:
            assert ring_sent == [2 * (w - 1) * n * 4 // w] * w
        naive_sent = [per_rank[r][i]["naive"]["sent"] for r in range(w)]
        assert (
            naive_sent == naive_bytes_sent_by_rank(n, 4, w) == [(w - 1) * n * 4] + [n * 4] * (w - 1)
        )


def test_segments_hold_at_most_segment_bytes():
    for n in (1, 7, 100, 4099, 100000):
        for w in (2, 3, 4):
            for seg in (4, 12, 1024, 2**19):
                k = segment_count(n, w, 4, seg)
                largest = max(b - a for a, b in chunk_bounds(n, w))
                pieces = [j - i for i, j in chunk_bounds(largest, k)]
                assert max(pieces) * 4 <= max(seg, 4), (n, w, seg)
                # and no more segments than that needs: one fewer would overflow one
                assert k == 1 or -(-largest // (k - 1)) * 4 > seg, (n, w, seg)


def test_chunk_bounds_cover_the_tensor():
    for n in range(0, 30):
        for w in range(1, 6):
            bounds = chunk_bounds(n, w)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and sum(sizes) == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(w - 1))
            assert max(sizes) - min(sizes) <= 1


# ---- tracer and profiler --------------------------------------------------------------------


def test_tracer_counts_direct_collectives(world):
    results, _ = world
    w = W
    f = 2 * (w - 1) / w
    ring_sent = ring_bytes_sent_by_rank(10, 4, w)
    for r, result in enumerate(results):
        traced = result["traced"]
        assert traced["restored"]
        events = traced["events"]
        assert events[:5] == [
            ("all_reduce", 4000, f * 4000),
            ("broadcast", 80, 80.0),
            ("all_gather_single", 8 * w, (w - 1) / w * 8 * w),
            ("reduce_scatter_single", 12 * w, (w - 1) / w * 12 * w),
            ("all_reduce", 32, f * 32),
        ]
        # the ring: 2(W-1) exchanges, each one batch of isend + irecv; what it sends is exact
        ring = events[5:-1]
        assert [e[0] for e in ring] == ["batch_isend_irecv"] * 2 * (w - 1)
        assert sum(e[1] for e in ring) == sum(e[2] for e in ring) == ring_sent[r]
        assert events[-1] == ("barrier", 0, 0.0)
        assert traced["step"]["comm/calls"] == len(events) == 6 + 2 * (w - 1)
        assert traced["step"]["comm/bytes"] == 4000 + 80 + 8 * w + 12 * w + 32 + ring_sent[r]


def test_tracer_ddp_bytes_equal_the_ring_theory(world):
    """The mlp on 3x32x32 synthetic images, 10 classes: its gradient bytes in closed form.
    DDP all-reduces them once per step; every step adds the int32 preemption flag
    (training/preempt.py), every log step the 5 float64 metric sums
    (training/metrics.py: loss, correct, predictions, samples, tokens)."""
    results, _ = world
    w, steps, log_every = W, TRAIN_STEPS, LOG_EVERY
    model_bytes = 4 * (3 * 32 * 32 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10)
    f = 2 * (w - 1) / w
    for result in results:
        comm = result["train"]["comm"]
        assert comm["model_grad_bytes"] == model_bytes
        assert comm["ring_theory_sent_per_rank_per_step"] == f * model_bytes
        assert comm["ops"]["ddp_bucket"]["bytes"] == steps * model_bytes
        logged = [s % log_every == 0 or s == steps for s in range(1, steps + 1)]
        assert comm["bytes_per_step"] == [model_bytes + 4 + 40 * lg for lg in logged]
        assert comm["sent_per_rank_per_step"] == [f * (model_bytes + 4 + 40 * lg) for lg in logged]
        assert comm["ops"]["all_reduce"]["calls"] == steps + sum(logged)


def test_train_ddp_writes_comm_to_summary_and_tensorboard(world):
    results, tmp = world
    summary = json.loads((tmp / "train" / "summary.json").read_text())
    assert summary["comm"] == json.loads(json.dumps(results[0]["train"]["comm"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "train" / "tb"))
    events.Reload()
    sent = [e.value for e in events.Scalars("comm/sent_per_rank")]
    assert sent == pytest.approx(summary["comm"]["sent_per_rank_per_step"])


def test_timeline_of_the_ddp_run_adds_up_to_the_tracer(world):
    """train_ddp.py --trace-comm wrote every rank's timeline; study.timeline's totals are the
    tracer's own per-step seconds (summary.json), and exposed <= busy <= total."""
    _, tmp = world
    result = timeline.main([str(tmp / "train")])
    summary = json.loads((tmp / "train" / "summary.json").read_text())
    assert [r["rank"] for r in result["per_rank"]] == list(range(W))
    assert result["per_rank"][0]["total_s"] == sum(summary["comm"]["seconds_per_step"][1:])
    for row in result["per_rank"]:
        assert row["steps"] == TRAIN_STEPS - 1
        assert 0 <= row["exposed_s"] <= row["busy_s"] <= row["total_s"] == row["tracer_total_s"]
    assert (tmp / "train" / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def _trace_events(path: Path, name_prefix: str) -> list[dict]:
    trace = json.loads(path.read_text())
    return [
        e
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("name", "").startswith(name_prefix)
    ]


def test_profile_trace_shows_all_reduce_overlapping_backward(world):
    _, tmp = world
    # train_ddp --profile: one trace per rank, with DDP's all-reduces in it
    for r in range(W):
        (trace,) = glob.glob(str(tmp / "train" / "profile" / f"rank{r}.*.pt.trace.json"))
        assert _trace_events(Path(trace), "gloo:all_reduce")
    # With several buckets, early buckets are all-reduced while backward is still running.
    (trace,) = glob.glob(str(tmp / "overlap" / "profile" / "rank0.*.pt.trace.json"))
    assert _overlapping(Path(trace)), "no all-reduce ran while backward was computing"


def _overlapping(trace: Path) -> list[dict]:
    """The all-reduce spans during which a backward op started (on another thread)."""
    reduces = _trace_events(trace, "gloo:all_reduce")
    backward = _trace_events(trace, "autograd::engine::evaluate_function")
    assert reduces and backward
    return [
        a
        for a in reduces
        if any(a["ts"] < b["ts"] < a["ts"] + a["dur"] and b["tid"] != a["tid"] for b in backward)
    ]


@pytest.mark.slow
def test_train_ddp_profile_of_resnet18_shows_the_overlap(tmp_path):
    """The real script on a model with several DDP buckets (about 45 MB of gradients)."""
    proc = torchrun(
        [
            "train_ddp.py",
            "--model=resnet18",
            "--train-size=64",
            "--batch-size=4",
            "--epochs=1",
            "--max-steps=5",
            "--no-eval",
            "--profile",
            f"--out-dir={tmp_path}",
        ],
        nproc=2,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for r in range(2):
        (trace,) = glob.glob(str(tmp_path / "profile" / f"rank{r}.*.pt.trace.json"))
        assert _overlapping(Path(trace))


# ---- benchmark ------------------------------------------------------------------------------


def test_bench_bandwidths_csv_and_plot(world):
    results, tmp = world
    rows = results[0]["bench"]
    assert [(r["op"], r["bytes"]) for r in rows] == [
        (op, size) for size in BENCH_SIZES for op in BENCH_OPS
    ]
    for row in rows:
        assert row["algbw_gbs"] == pytest.approx(row["bytes"] / (row["time_us"] * 1e-6) / 1e9)
        # W = 4: all-reduce 2(N-1)/N, broadcast 1, all-gather and reduce-scatter (N-1)/N
        factor = {"all_reduce": 1.5, "ring_all_reduce": 1.5, "broadcast": 1.0}.get(row["op"], 0.75)
        assert row["busbw_gbs"] == pytest.approx(row["algbw_gbs"] * factor)
    with open(tmp / "bench" / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["op"], int(r["bytes"])) for r in table] == [(r["op"], r["bytes"]) for r in rows]
    assert (tmp / "bench" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = Image.open(tmp / "bench" / "bench.png").text["Title"]  # the plot's title, as drawn
    assert re.search(r"^collectives, 4 ranks, gloo, load average \d+\.\d on \d+ cores;", title)
    # every rank agrees on the times: they are the slowest rank's
    assert [r["time_us"] for r in results[1]["bench"]] == [r["time_us"] for r in rows]


def test_bench_flags():
    assert bench.sizes(bench.parse_size("1K"), bench.parse_size("16K"), 4) == [1024, 4096, 16384]
    with pytest.raises(UsageError, match="larger than"):
        bench.main(["--min-bytes", "1M", "--max-bytes", "1K"])
    with pytest.raises(UsageError, match="not a size"):
        bench.main(["--max-bytes", "lots"])
    with pytest.raises(UsageError):
        bench.main(["--ops", "all_reduce_fast"])


def test_launch_hands_torchrun_a_command_it_accepts(monkeypatch):
    """`python -m study.bench --nproc 3` (and every benchmark that launches itself) re-runs
    its command line under torchrun: torchrun's own parser must accept it, and the ranks
    get the benchmark's flags without the world flags the launcher used up."""
    calls = []
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, **_: calls.append(cmd) or 0)
    argv = ["--out-dir", "x", "--nproc", "3", "--backend", "gloo", "--iters", "2", "--nproc=3"]
    assert bench.launch("study.bench", argv, "gloo", 3) == 0
    parsed = get_args_parser().parse_args(calls[0][3:])  # after `python -m torch.distributed.run`
    assert (parsed.nproc_per_node, parsed.training_script) == ("3", "study.bench")
    assert parsed.training_script_args == ["--out-dir", "x", "--iters", "2", "--backend", "gloo"]
