"""study.timeline against what it must show: a small MLP with one bucket per layer, on 2 ranks.

With --sync allreduce every collective starts after backward has ended, so nothing is
hidden (overlap fraction 0 by construction; the test allows 0.1). With --sync overlap the
buckets of layers 6..2 are launched while backward still computes layers 5..1; only the last
bucket, launched when backward ends, and the tails of the others can be exposed. Robustness on
a loaded box: what is hidden is the backward time after the first launch, what is exposed is
the communication left when backward ends, so the fraction falls when gloo's threads are slowed
more than the computation. The shapes make compute dominate: each layer's backward (two
2048x128x128 matmuls) against the all-reduce of its 64 KiB bucket. Measured on the 2-core box:
0.93 at load 11 (a first try with 256-wide layers and 512 samples gave 0.39 at load 9, which
is why the batch is large and the layers narrow); the bound is 0.3.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from core.errors import UsageError
from study import timeline
from tests.multiproc import run_world

LAYERS, WIDTH, BATCH, STEPS = 6, 128, 2048, 4
BUCKET_BYTES = 16 * 2**10  # each 64 KiB weight closes a bucket: one bucket per layer


def _train(rank: int, world_size: int, out_root: str) -> None:
    import torch.distributed as dist

    from comm.tracer import CommTracer
    from core.dist import DistEnv
    from parallel.factory import make_sync

    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    for mode in ("allreduce", "overlap"):
        torch.manual_seed(0)
        layers = [m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
        model = nn.Sequential(*layers)
        sync = make_sync(mode, model, env, bucket_bytes=BUCKET_BYTES)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(rank))
        with CommTracer(out_dir=Path(out_root) / mode) as tracer:
            tracer.attach(model)
            for _ in range(STEPS):
                optimizer.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                sync.finish_backward()
                optimizer.step()
                tracer.end_step()
        dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("timeline")
    run_world(_train, 2, str(root), timeout=120)
    return {
        mode: (timeline.main([str(root / mode)]), root / mode) for mode in ("allreduce", "overlap")
    }


def test_allreduce_hides_nothing_and_overlap_hides_most(runs):
    allreduce, _ = runs["allreduce"]
    overlap, _ = runs["overlap"]
    assert allreduce["overlap_fraction"] <= 0.1, allreduce
    assert overlap["overlap_fraction"] >= 0.3, overlap
    assert overlap["exposed_s"] < overlap["busy_s"]


def test_numbers_are_consistent_with_the_tracer(runs):
    for result, out_dir in runs.values():
        assert result["skipped_steps"] == 1 and len(result["per_rank"]) == 2
        for row in result["per_rank"]:
            assert row["steps"] == STEPS - 1
            assert 0 <= row["exposed_s"] <= row["busy_s"] <= row["total_s"]
            assert row["total_s"] == row["tracer_total_s"]  # the same floats, added alike
        assert result["total_s"] == sum(r["total_s"] for r in result["per_rank"])
        assert (out_dir / "timeline.png").read_bytes()[:4] == b"\x89PNG"
        assert (out_dir / "timeline.json").exists()


def test_buckets_and_phases_of_every_step(runs):
    # allreduce: communicate() with a 64 KiB cap, in definition order: each weight, each bias
    # alone. overlap: DDP's rule in gradient-ready order, a bias with its weight.
    # Both first agree which parameters got a gradient (parallel/base.py's used map: one
    # int32 per tensor); overlap when backward ends, after the buckets it launched during it.
    used_map = [4 * 2 * LAYERS]
    buckets = {
        "allreduce": used_map + [4 * WIDTH * WIDTH, 4 * WIDTH] * LAYERS,
        "overlap": [4 * (WIDTH * WIDTH + WIDTH)] * LAYERS + used_map,
    }
    for mode, (_, out_dir) in runs.items():
        rank0 = json.loads((out_dir / "timeline" / "rank0.json").read_text())
        assert len(rank0["steps"]) == STEPS and rank0["backend"] == "gloo"
        for step in rank0["steps"][1:]:
            assert [p[0] for p in step["phases"]] == ["forward", "backward", "optimizer"]
            assert [c["bytes"] for c in step["comm"]] == buckets[mode]
            assert all(0 <= c["start"] <= c["end"] <= step["duration"] for c in step["comm"])
            backward_end = step["phases"][1][2]
            launched_in_backward = sum(c["start"] < backward_end for c in step["comm"])
            if mode == "overlap":  # all but perhaps the last, launched by the last gradient
                assert launched_in_backward >= LAYERS - 1
            else:
                assert launched_in_backward == 0


def test_interval_arithmetic():
    assert timeline.union([(3, 4), (0, 1), (0.5, 2), (5, 5)]) == [(0, 2), (3, 4)]
    assert timeline.minus([(0, 10)], [(1, 2), (1.5, 3), (8, 12)]) == pytest.approx(6)
    assert timeline.minus([(0, 1), (0.5, 2)], []) == 2


def test_refuses_a_directory_without_a_timeline(tmp_path):
    with pytest.raises(UsageError, match="no timeline"):
        timeline.main([str(tmp_path)])


def test_refuses_the_timeline_of_an_nccl_run(tmp_path):
    """Host times of NCCL calls are launch times: the overlap they show would be false."""
    (tmp_path / "timeline").mkdir()
    rank0 = {"rank": 0, "world_size": 1, "backend": "nccl", "steps": []}
    (tmp_path / "timeline" / "rank0.json").write_text(json.dumps(rank0))
    with pytest.raises(UsageError, match="from an NCCL run.*--profile"):
        timeline.main([str(tmp_path)])


def test_observer_writes_the_timeline_on_a_clean_exit_only(tmp_path):
    """training/observe.py hands the run's exception to the tracer, which writes
    <out-dir>/timeline/ only when the run ended cleanly (a failed run leaves no file)."""
    import argparse

    from core.dist import DistEnv
    from training.observe import Observer

    env = DistEnv(0, 0, 1, 1, "none", torch.device("cpu"))
    args = argparse.Namespace(trace_comm=True, profile=False)
    for fails in (False, True):
        out = tmp_path / ("failed" if fails else "clean")
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        expect = pytest.raises(RuntimeError) if fails else contextlib.nullcontext()
        with expect, Observer(args, env, model, out) as observer:
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
            observer.step()
            if fails:
                raise RuntimeError("the run failed")
        assert (out / "timeline" / "rank0.json").exists() != fails
