"""The pitfalls lab: every --wrong run shows its symptom, every --right run does not.

The default suite runs all eleven pitfalls in one 2-rank world (each script's `run()` in
process), the deadlocks on process groups with a 2 s timeout, and the unguarded DataLoader
script in a subprocess alongside it. The slow tests run every script under torchrun, as a
reader would, and check that a deadlock under the real launcher ends by itself with a clear
error."""

from __future__ import annotations

import copy
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pitfalls import FAILS_WHEN_WRONG, SCRIPTS
from pitfalls.common import parse_result
from tests.multiproc import PYTHON, ROOT, run_world, torchrun

SHORT = timedelta(seconds=2)  # process-group timeout for the deadlock pitfalls


def _lab(rank: int, world_size: int, tmp: str) -> dict:
    from core.dist import distributed
    from pitfalls import (
        batchnorm,
        clip_grad,
        dataloader_spawn,
        loss_normalization,
        map_location,
        no_sync,
        padded_eval,
        rank0_collective,
        set_epoch,
        uneven_inputs,
        unused_parameters,
    )

    out: dict = {}

    def check(name: str, right: bool, run, *args) -> None:
        out[name, "right" if right else "wrong"] = run(right, *args)

    # Started first, finished last: the unguarded script (a subprocess) and the spawned
    # DataLoader worker (a thread waiting on it) boot while the deadlocks below sit idle.
    unguarded = None
    if rank == 0:
        unguarded = subprocess.Popen(
            [PYTHON, str(ROOT / "pitfalls" / "unguarded_loader.py")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        with distributed() as env, ThreadPoolExecutor(1) as pool:
            spawned = pool.submit(check, "dataloader_spawn", True, dataloader_spawn.run, False)
            # The first DDP model pays for lazy imports, which on a busy machine can take one
            # rank seconds longer than the other: pay it here, under the default group's
            # long timeout, not inside a 2 s group.
            DDP(torch.nn.Linear(1, 1))
            for right in (False, True):
                # A group of its own with a short timeout: the deadlock ends in 2 s, and the
                # default group stays clean for the checks that follow. Each starts with the
                # ranks in step (barrier), so only the deadlock can exhaust the 2 s.
                dist.barrier()
                check("uneven_inputs", right, uneven_inputs.run, dist.new_group(timeout=SHORT))
                directory = Path(tmp) / f"rank0_collective_{right}"
                directory.mkdir(exist_ok=True)
                group = dist.new_group(timeout=SHORT)
                dist.barrier()
                check("rank0_collective", right, rank0_collective.run, directory, group)
                check("set_epoch", right, set_epoch.run)
                check("unused_parameters", right, unused_parameters.run)
                check("batchnorm", right, batchnorm.run, env)
                check("no_sync", right, no_sync.run)
                directory = Path(tmp) / f"map_location_{right}"
                directory.mkdir(exist_ok=True)
                check("map_location", right, map_location.run, env, directory)
                check("padded_eval", right, padded_eval.run)
                check("clip_grad", right, clip_grad.run)
                check("loss_normalization", right, loss_normalization.run)
            check("dataloader_spawn", False, dataloader_spawn.run, False)
            out["cross_rank_bn"] = _cross_rank_bn_vs_batchnorm(rank, world_size)
            spawned.result(timeout=120)
        if unguarded is not None:
            _, err = unguarded.communicate(timeout=120)
            out["unguarded"] = (unguarded.returncode, err)
    finally:
        if unguarded is not None:
            unguarded.kill()
    return out


def _cross_rank_bn_vs_batchnorm(rank: int, world_size: int) -> dict:
    """CrossRankBatchNorm on this rank's slice against nn.BatchNorm on the global batch, for
    2D and 4D inputs: outputs, input gradients, running statistics, then eval mode."""
    import torch.nn as nn

    from pitfalls.batchnorm import CrossRankBatchNorm

    errors = {}
    for shape, reference in [((6, 3), nn.BatchNorm1d(3)), ((4, 3, 5, 5), nn.BatchNorm2d(3))]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(world_size * shape[0], *shape[1:], generator=g) * 3 + 5
        upstream = torch.randn(x.shape, generator=g)
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5, generator=g)
            reference.bias.uniform_(-1, 1, generator=g)
        ours = CrossRankBatchNorm.convert(nn.Sequential(copy.deepcopy(reference)))[0]
        assert isinstance(ours, CrossRankBatchNorm)
        mine = slice(rank * shape[0], (rank + 1) * shape[0])
        x_all, x_mine = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        for _ in range(2):  # two steps: the running statistics compound
            y_all = reference(x_all)
            y_mine = ours(x_mine)
        # Each rank's loss is its share of the global one: sum(upstream * y).
        (upstream * y_all).sum().backward()
        (upstream[mine] * y_mine).sum().backward()
        # Parameter gradients are per-rank partial sums: add them up to compare.
        w_grad = ours.weight.grad.clone()
        dist.all_reduce(w_grad)
        ours.eval()
        reference.eval()
        errors[len(shape)] = max(
            (y_mine - y_all[mine]).abs().max().item(),
            (x_mine.grad - x_all.grad[mine]).abs().max().item(),
            (w_grad - reference.weight.grad).abs().max().item(),
            (ours.running_mean - reference.running_mean).abs().max().item(),
            (ours.running_var - reference.running_var).abs().max().item(),
            (ours(x_mine) - reference(x[mine])).abs().max().item(),
        )
    return errors


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> list[dict]:
    return run_world(_lab, 2, str(tmp_path_factory.mktemp("lab")), timeout=150)


def both(lab: list[dict], name: str, mode: str) -> list[dict]:
    return [ranks[name, mode] for ranks in lab]


def assert_deadlock_ended(ranks: list[dict]) -> None:
    """Every rank failed after about the 2 s timeout, not a hang: the first to give up timed
    out; its peer may time out too, or see the connection close when the first one gives
    up."""
    assert all(values["outcome"] in ("timeout", "error") for values in ranks), ranks
    assert any(values["outcome"] == "timeout" for values in ranks), ranks
    assert any("Timed out waiting 2000ms" in values["message"] for values in ranks), ranks
    for values in ranks:
        assert 1.5 <= values["waited_s"] < 10, values


def test_set_epoch(lab):
    wrong, right = lab[0]["set_epoch", "wrong"], lab[0]["set_epoch", "right"]
    assert wrong["epochs"] == 3 and wrong["distinct_orders"] == 1
    assert len(set(wrong["orders"])) == 1
    assert right["distinct_orders"] == 3 and len(set(right["orders"])) == 3


# The float32 thresholds of the right runs below (1e-6, 1e-5): each script compares one or a
# few steps of a computation without ties that could flip (Linear layers, BatchNorm; the
# ReLUs of unused_parameters see the same inputs in both runs) against the same computation
# summed in another order. That costs a few float32 ulps of O(1) values (u = 6e-8; measured
# at most 1.2e-7 under ATEN_CPU_CAPABILITY=default and =avx2): >= 8x margin. The smallest
# symptom of a wrong run is 1.7e-3 (batchnorm's param_diff), >= 100x above them.


def test_uneven_inputs_timeout_then_join(lab):
    assert_deadlock_ended(both(lab, "uneven_inputs", "wrong"))
    for values in both(lab, "uneven_inputs", "right"):
        assert values["outcome"] == "finished", values
        assert values["batches"] == [2, 3]
        assert values["max_error_vs_replay"] < 1e-6
        assert values["max_spread_across_ranks"] == 0


def test_rank0_collective_timeout_then_barrier_outside(lab):
    assert_deadlock_ended(both(lab, "rank0_collective", "wrong"))
    for values in both(lab, "rank0_collective", "right"):
        assert values["outcome"] == "finished", values
        assert values["metric_sum"] == 3.0 and values["loaded_matches"]


def test_unused_parameters(lab):
    for values in both(lab, "unused_parameters", "wrong"):
        assert values["outcome"] == "error"
        assert "Expected to have finished reduction" in values["message"]
    for values in both(lab, "unused_parameters", "right"):
        assert values["outcome"] == "finished"
        for fix in ("find_unused", "static_graph"):
            assert values[f"{fix}_max_diff"] < 1e-6
            assert values[f"{fix}_aux_head_grad"] is False
            assert values[f"ms_per_step_{fix}"] > 0


def test_batchnorm_per_rank_statistics_vs_synchronised(lab):
    wrong, right = lab[0]["batchnorm", "wrong"], lab[0]["batchnorm", "right"]
    assert wrong["norm"] == "BatchNorm2d"
    for key in ("output_diff", "running_mean_diff", "running_var_diff", "param_diff"):
        assert wrong[key] > 1e-4, (key, wrong)
        assert right[key] < 1e-5, (key, right)
    assert right["norm"] == "CrossRankBatchNorm"  # CPU: nn.SyncBatchNorm refuses CPU tensors


def test_cross_rank_batchnorm_matches_batchnorm(lab):
    for ranks in lab:
        assert set(ranks["cross_rank_bn"]) == {2, 4}
        for dims, error in ranks["cross_rank_bn"].items():
            # Inputs ~ N(5, 3^2): var = E[x^2] - mean^2 cancels 34 - 25, a loss of about 4x
            # in relative precision over the u = 6e-8 of float32, on outputs and running
            # statistics of O(1..10): ~1e-6; 1e-4 is loose, and still far below what
            # per-rank statistics do to the outputs (2.2e-2 in the batchnorm pitfall).
            assert error < 1e-4, (dims, error)


def test_no_sync_around_backward_only(lab):
    for values in both(lab, "no_sync", "wrong"):
        assert values["allreduces"] == values["micro_steps"] == 4
        assert values["synced_after_first_micro_step"] is True
        assert values["grad_error"] < 1e-5
    for values in both(lab, "no_sync", "right"):
        assert values["allreduces"] == 1
        assert values["synced_after_first_micro_step"] is False
        assert values["grad_error"] < 1e-5


def test_map_location(lab):
    wrong, right = lab[0]["map_location", "wrong"], lab[0]["map_location", "right"]
    assert wrong["recorded"] == right["recorded"] == ["cuda:0"]
    assert wrong["outcome"] == "error" and wrong["loaded_on"] == ["error", "error"]
    assert "map_location" in wrong["message"]
    assert right["outcome"] == "own_device" and right["loaded_on"] == ["cpu", "cpu"]


def test_padded_eval(lab):
    wrong, right = lab[0]["padded_eval", "wrong"], lab[0]["padded_eval", "right"]
    assert wrong["samples"] == 9 and wrong["counted"] == 10
    assert wrong["accuracy"] == pytest.approx(0.6) != wrong["true_accuracy"]
    assert right["counted"] == 9
    assert right["accuracy"] == pytest.approx(right["true_accuracy"]) == pytest.approx(5 / 9)


# The two float64 pitfalls below compare one step against a one-process oracle summed in
# another order: a few units of float64 roundoff (u = 1.1e-16) on values of order 1, measured
# at most 2.2e-16 (ATEN_CPU_CAPABILITY=default and avx2); 1e-12 leaves 10^4 of headroom. The
# wrong runs miss by 10^-2 and more.


def test_clip_grad_per_micro_batch_and_before_the_sync(lab):
    wrong, right = lab[0]["clip_grad", "wrong"], lab[0]["clip_grad", "right"]
    x = wrong["max_norm"]
    assert wrong["oracle_norm"] == right["oracle_norm"] > x  # clipping is active
    # Per micro-batch: clipped by the norms of partial sums, twice.
    assert len(wrong["per_micro_batch_norms"]) == 2
    assert all(n > x for n in wrong["per_micro_batch_norms"])
    assert wrong["per_micro_batch_error"] > 1e-3
    # Before the sync: each rank's own norm, none of them the global one.
    local = wrong["before_sync_norms"]
    assert len(local) == 2 and local[0] != local[1]
    assert all(abs(n - wrong["oracle_norm"]) > 1e-2 for n in local)
    assert wrong["before_sync_error"] > 1e-3
    # After the sync, once: the one-process norm and step.
    assert right["norm"] == pytest.approx(right["oracle_norm"], rel=1e-12)
    assert right["error"] < 1e-12


def test_loss_normalization_mean_of_means_vs_global_count(lab):
    wrong = lab[0]["loss_normalization", "wrong"]
    assert wrong["valid"] == [6, 5, 2, 1]
    assert wrong["loss_error"] > 1e-2 and wrong["grad_error"] > 1e-1
    for ranks in lab:  # every rank logs the same loss and holds the oracle's gradient
        right = ranks["loss_normalization", "right"]
        assert right["loss"] == pytest.approx(right["true_loss"], rel=1e-12)
        assert right["loss_error"] < 1e-12 and right["grad_error"] < 1e-12


def test_dataloader_spawn(lab):
    for values in both(lab, "dataloader_spawn", "wrong"):
        assert values["outcome"] == "error"
        assert "pickle" in values["message"] and "lambda" in values["message"]
    for values in both(lab, "dataloader_spawn", "right"):
        assert values["outcome"] == "finished" and values["batches_match"] is True
    status, stderr = lab[0]["unguarded"]
    assert status != 0
    assert "bootstrapping phase" in stderr and "exited unexpectedly" in stderr


# ------------------------------------------------------------ the scripts, under torchrun


def _pitfall(
    script: str, mode: str, *flags: str, timeout: float = 120, gpus: bool = False
) -> tuple[dict, str, int]:
    argv = [f"pitfalls/{script}.py", f"--{mode}", *flags]
    proc = torchrun(argv, nproc=2, timeout=timeout, gpus=gpus)
    try:
        values = parse_result(proc.stdout)
    except ValueError:
        raise AssertionError(f"no RESULT line\n{proc.stdout}\n{proc.stderr}") from None
    assert values["pitfall"] == script and values["mode"] == mode
    return values, proc.stderr, proc.returncode


@pytest.mark.slow
def test_torchrun_deadlock_ends_with_clear_error():
    """The real launcher, a 2 s timeout: the job ends on its own, rank 0 says why."""
    start = time.monotonic()
    values, stderr, status = _pitfall("uneven_inputs", "wrong", "--timeout", "2", timeout=150)
    assert status == 1
    assert values["outcome"] in ("timeout", "error") and float(values["waited_s"]) < 10
    assert "error: rank 0 (2 batches) gave up after" in stderr
    assert time.monotonic() - start < 150


# Each script's two runs: what its RESULT line must say, and its exit status.
SYMPTOMS = {
    "set_epoch": (lambda v: v["distinct_orders"] == "1", lambda v: v["distinct_orders"] == "3"),
    "uneven_inputs": (
        lambda v: v["outcome"] in ("timeout", "error"),
        lambda v: v["outcome"] == "finished" and float(v["max_error_vs_replay"]) < 1e-6,
    ),
    "rank0_collective": (
        lambda v: v["outcome"] in ("timeout", "error"),
        lambda v: v["outcome"] == "finished" and v["loaded_matches"] == "True",
    ),
    "unused_parameters": (
        lambda v: v["outcome"] == "error",
        lambda v: (
            float(v["find_unused_max_diff"]) < 1e-6 and float(v["static_graph_max_diff"]) < 1e-6
        ),
    ),
    "batchnorm": (
        lambda v: float(v["output_diff"]) > 1e-4 and float(v["running_mean_diff"]) > 1e-4,
        lambda v: float(v["output_diff"]) < 1e-5 and float(v["param_diff"]) < 1e-5,
    ),
    "no_sync": (lambda v: v["allreduces"] == "4", lambda v: v["allreduces"] == "1"),
    "map_location": (
        lambda v: v["recorded"] == "cuda:0" and v["loaded_on"] == "error,error",
        lambda v: v["loaded_on"] == "cpu,cpu",
    ),
    "padded_eval": (
        lambda v: v["counted"] == "10" and v["accuracy"] == "0.6",
        lambda v: v["counted"] == "9" and v["accuracy"] == v["true_accuracy"],
    ),
    "dataloader_spawn": (
        lambda v: v["lambda"] != "loaded" and v["unguarded_bootstrap_error"] == "True",
        lambda v: v["batches_match"] == "True",
    ),
    "clip_grad": (
        lambda v: float(v["per_micro_batch_error"]) > 1e-3 and float(v["before_sync_error"]) > 1e-3,
        lambda v: float(v["error"]) < 1e-12 and v["norm"] == v["oracle_norm"],
    ),
    "loss_normalization": (
        lambda v: float(v["loss_error"]) > 1e-2 and float(v["grad_error"]) > 1e-1,
        lambda v: float(v["loss_error"]) < 1e-12 and float(v["grad_error"]) < 1e-12,
    ),
}
assert set(SYMPTOMS) == set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SYMPTOMS))
def test_torchrun_script(script):
    for mode, check in zip(("wrong", "right"), SYMPTOMS[script], strict=True):
        values, stderr, status = _pitfall(script, mode)  # the default 5 s timeout
        assert check(values), (mode, values, stderr)
        failed = mode == "wrong" and script in FAILS_WHEN_WRONG
        assert status == (1 if failed else 0), (mode, status, stderr)
        if failed:
            assert "error: " in stderr


@pytest.mark.gpu(2)
def test_gpu_pitfalls():
    """With GPUs (nccl, TF32 off): torch's SyncBatchNorm is the fix, and a checkpoint saved
    from cuda:0 lands on cuda:0 in every rank unless map_location says otherwise."""
    values, _, _ = _pitfall("batchnorm", "right", gpus=True)
    # Against a CPU reference in float32: outputs of order 1 differ by a few ulps (1e-6) where
    # the kernels sum in another order; TF32 would leave 1e-3.
    assert values["norm"] == "SyncBatchNorm" and float(values["output_diff"]) < 1e-4
    values, _, _ = _pitfall("map_location", "wrong", gpus=True)
    assert values["loaded_on"] == "cuda:0,cuda:0" and values["outcome"] == "wrong_device"
    values, _, _ = _pitfall("map_location", "right", gpus=True)
    assert values["loaded_on"] == "cuda:0,cuda:1" and values["outcome"] == "own_device"
