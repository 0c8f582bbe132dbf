"""Every hand-made sync mode trains exactly like DDP.

The 4-rank world of tests.comm_world runs train_ddp.main in-process once per mode (same
seed, same data, 4 optimizer steps, in float64) and hands back rank 0's checkpoint and every
rank's parameter checksum. The oracle is `--sync ddp`, DistributedDataParallel's own reducer.
"""

import csv
import functools
import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import train_ddp
from core.dist import DistEnv
from core.errors import UsageError
from parallel import factory as sync_module
from parallel.local_sgd import LocalSGDSync
from parallel.overlap import OverlapSync
from tests import comm_world
from tests.multiproc import PYTHON, run_cmd
from training.checkpoint import load_checkpoint
from training.models import build_model

# float64: see TOLERANCE below for why the comparisons are made in it.
COMMON = [
    "--train-size", "256", "--eval-size", "4", "--batch-size", "8", "--epochs", "1",
    "--max-steps", "4", "--no-eval", "--log-every", "2", "--dtype", "float64",
]  # fmt: skip
SMALL_BUCKETS = 4096  # bytes: splits the default CNN's gradients into several buckets
ACCUM_SGD = ["--grad-accum", "2", "--momentum", "0"]  # the second group: plain SGD
RUNS = {
    "ddp": [],
    "allreduce": ["--sync", "allreduce"],
    "overlap": ["--sync", "overlap"],
    "allreduce-shm": ["--sync", "allreduce", "--transport", "shm"],  # comm/shm.py's all-reduce
    "overlap-shm": ["--sync", "overlap", "--transport", "shm"],
    "ddp-accum-sgd": ACCUM_SGD,
    "allreduce-accum-sgd": ["--sync", "allreduce", *ACCUM_SGD],
    "overlap-accum-sgd-small-buckets": ["--sync", "overlap", *ACCUM_SGD],
    "local-sgd-1-accum-sgd": ["--sync", "local-sgd", "--sync-every", "1", *ACCUM_SGD],
    "local-sgd-2": ["--sync", "local-sgd", "--sync-every", "2"],  # momentum 0.9 is averaged too
    # 4 steps are not a multiple of 3: the final checkpoint must still be one averaged model.
    "local-sgd-3": ["--sync", "local-sgd", "--sync-every", "3"],
}


def replica_hash(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def overlap_in_flight(rank: int) -> dict:
    """Does overlap launch buckets while backward is still running, and not under no_sync?"""
    torch.manual_seed(0)
    model = build_model("cnn", 3, 32, 10)
    first_weight = model[0].weight  # its gradient is among the last that backward computes
    seen, ready = [], []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ready.append(id(p)))
    # Registered before the sync's own hooks, so it runs before this bucket is launched.
    first_weight.register_post_accumulate_grad_hook(lambda p: seen.append(sync.in_flight))
    sync = OverlapSync(model, SMALL_BUCKETS, SMALL_BUCKETS)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    with sync.no_sync():
        nn.functional.cross_entropy(model(x), y).backward()
    in_no_sync = sync.in_flight
    seen.clear()
    nn.functional.cross_entropy(model(x), y).backward()
    after_backward = sync.in_flight
    buckets_before = len(sync.buckets)
    sync.finish_backward()
    # DDP's rebuild: the buckets now follow the order in which the gradients became ready.
    rebuilt = [id(p) for bucket in sync.buckets for p in bucket]
    return {
        "buckets": buckets_before,
        "rebuilt_in_ready_order": rebuilt == ready[-len(rebuilt) :],
        "at_first_layer": seen,
        "in_no_sync": in_no_sync,
        "after_backward": after_backward,
        "after_finish": sync.in_flight,
    }


def sync_checks(rank: int, world_size: int, out_root: str) -> dict:
    """Runs on every rank of tests.comm_world."""
    per_step: list[str] = []
    original_after_step = LocalSGDSync.after_step

    def recording_after_step(self, optimizer):
        original_after_step(self, optimizer)
        params = list(self.model.parameters())
        momenta = [optimizer.state[p]["momentum_buffer"] for p in params]
        per_step.append(replica_hash(params + momenta))

    results: dict = {"overlap_in_flight": overlap_in_flight(rank)}
    for name, flags in RUNS.items():
        out_dir = Path(out_root) / name
        sync_from_args = train_ddp.sync_from_args
        if name.endswith("small-buckets"):
            train_ddp.sync_from_args = functools.partial(sync_from_args, bucket_bytes=SMALL_BUCKETS)
        if name == "local-sgd-2":
            LocalSGDSync.after_step = recording_after_step
        try:
            summary = train_ddp.main([*COMMON, *flags, "--out-dir", str(out_dir)])
        finally:
            train_ddp.sync_from_args = sync_from_args
            LocalSGDSync.after_step = original_after_step
        results[name] = {
            "checksum": summary["param_checksum"],
            "steps": summary["steps"],
            "model": load_checkpoint(out_dir / "checkpoint.pt")["model"] if rank == 0 else None,
        }
    results["local-sgd-2"]["per_step"] = per_step
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return [r["sync"] for r in comm_world.results()]


# Error model. Each mode averages the same float64 gradients as DDP in another order (per
# tensor, per bucket; local SGD averages parameters instead), so each step's update differs
# by a few units of float64 roundoff (u = 1.1e-16) relative: after these 4 steps the
# parameters (|p| < 1) are at most 8.3e-17 apart (measured under ATEN_CPU_CAPABILITY=default
# and avx2). In float32 this test failed, 9e-6 apart: rounding (~1e-7) had resolved a
# max-pool/ReLU tie the other way, which moves a weight by about lr x its gradient. In
# float64 a flip needs one of the ~1e6 max-pool/ReLU comparisons per step to be within
# ~1e-15 (relative) of a tie: a chance of about 1e-9 per step. TOLERANCE is 10^6 above the
# rounding, and real bugs land 10^7 above it (injected by hand into --sync allreduce:
# averaging over W - 1 instead of W 8e-3, one rank's gradients left out 2e-2, one rank
# keeping its own gradient 5e-2, one of two accumulated micro-batches counted twice and the
# other not 5.6e-3).
TOLERANCE = 1e-10


def assert_same_params(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float64, key
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{what}: {key} differs by {diff:.3g}"


@pytest.mark.oracle
def test_allreduce_and_overlap_reach_ddps_parameters(runs):
    rank0 = runs[0]
    torch.manual_seed(0)
    initial = build_model("cnn", 3, 32, 10).state_dict()
    moved = max((rank0["ddp"]["model"][k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3, "training did not move the parameters: the comparison would be empty"
    for ddp, mine in [
        ("ddp", "allreduce"),
        ("ddp", "overlap"),
        ("ddp", "allreduce-shm"),
        ("ddp", "overlap-shm"),
        ("ddp-accum-sgd", "allreduce-accum-sgd"),
        ("ddp-accum-sgd", "overlap-accum-sgd-small-buckets"),
        ("ddp-accum-sgd", "local-sgd-1-accum-sgd"),
    ]:
        assert rank0[mine]["steps"] == rank0[ddp]["steps"] == 4
        assert_same_params(rank0[ddp]["model"], rank0[mine]["model"], f"{mine} vs {ddp}")
        # Every rank applied the same averaged update: replicas are bit-identical.
        assert len({r[mine]["checksum"] for r in runs}) == 1, f"{mine}: replicas differ"


@pytest.mark.oracle
def test_local_sgd_replicas_equal_right_after_each_average(runs):
    steps = [r["local-sgd-2"]["per_step"] for r in runs]
    assert all(len(s) == 4 for s in steps)
    for step in range(4):
        distinct = {s[step] for s in steps}
        if (step + 1) % 2 == 0:
            assert len(distinct) == 1, f"after averaging step {step + 1} the replicas differ"
        else:
            assert len(distinct) == len(runs), f"step {step + 1}: ranks did not step alone"


@pytest.mark.oracle
def test_local_sgd_checkpoint_is_the_average_when_steps_are_not_a_multiple_of_k(runs):
    # Steps 1-3 alone, average, step 4 alone: without the average before the checkpoint,
    # each rank would end with its own replica and the file would hold rank 0's.
    assert len({r["local-sgd-3"]["checksum"] for r in runs}) == 1


def test_overlap_launches_buckets_during_backward(runs):
    for r in runs:
        seen = r["overlap_in_flight"]
        assert seen["buckets"] >= 3
        assert seen["in_no_sync"] == 0, "no_sync() must not communicate"
        # When backward reached the first layer, later layers' buckets were already out.
        assert len(seen["at_first_layer"]) == 1 and seen["at_first_layer"][0] >= 1
        assert seen["after_backward"] == seen["buckets"]
        assert seen["after_finish"] == 0
        assert seen["rebuilt_in_ready_order"]


def test_sync_every_is_for_local_sgd_and_diloco_only():
    env = DistEnv(0, 0, 1, 1, "gloo", torch.device("cpu"))
    with pytest.raises(UsageError, match="--sync-every applies to --sync local-sgd and diloco"):
        sync_module.make_sync("overlap", nn.Linear(2, 2), env, sync_every=2)
    with pytest.raises(UsageError, match="positive"):
        train_ddp.parse_args(["--sync", "local-sgd", "--sync-every", "0"])
    with pytest.raises(UsageError, match="unknown --sync"):
        sync_module.make_sync("ring", nn.Linear(2, 2), env)


@pytest.mark.slow
def test_benchmark_writes_table_csv_and_plot(tmp_path):
    result = run_cmd(
        [PYTHON, "-m", "benchmarks.bench_sync", "--rounds", "1", "--steps", "1", "--warmup", "1"]
        + ["--layers", "5", "--out-dir", str(tmp_path)],
        timeout=240,
        check=True,
    )
    with open(tmp_path / "bench_sync.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = {r["variant"]: float(r["ratio"]) for r in rows if r["section"] == "sync step"}
    assert list(steps) == ["none", "ddp", "allreduce", "overlap", "local-sgd K=4", "diloco K=4"]
    assert steps["ddp"] == 1.0 and all(ratio > 0 for ratio in steps.values())
    comms = [r["variant"] for r in rows if r["section"] == "communication"]
    assert comms[0] == "all_reduce per tensor" and "communicate, 1 buffer" in comms
    assert "communicate, 1 buffer" in result.stdout and "vs ddp" in result.stdout
    assert (tmp_path / "bench_sync.png").read_bytes()[:4] == b"\x89PNG"
