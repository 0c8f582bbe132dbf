"""What each rank holds, and what the job reports about it, agree.

- Evaluation and checkpoints see one model on every rank: with BatchNorm, every rank's own
  running statistics are replaced by rank 0's (the checkpoint's) first, in every sync mode,
  and the hand-made modes broadcast buffers exactly when DDP does.
- Saving a checkpoint or evaluating never changes the trajectory, local-sgd included (its
  checkpoint keeps each rank's replica), and a local-sgd run resumes bit for bit.
- Each rank resumes its own random generators, and only its own GPU's.
- `communicate()` leaves a rank outside the op's group untouched.
- The process group is destroyed on a clean exit only.
- --sync and --sync-every are trajectory flags: resume refuses other values.

One 3-rank world runs the multi-rank checks together (starting ranks is most of the cost).
"""

from __future__ import annotations

import functools
import hashlib
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import train_ddp
from comm.communicate import communicate
from core import dist as comm_dist
from core import errors as core_errors
from core.dist import DistEnv
from core.errors import UsageError
from data.datasets import build_datasets
from data.sampling import eval_loader
from parallel.factory import make_sync
from tests.multiproc import run_world
from training.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
    training_state,
    unwrap,
)
from training.metrics import evaluate
from training.models import build_model

WORLD = 3


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()


def _buffer_timing(rank: int, world_size: int) -> dict:
    """Three optimizer steps of two accumulated micro-steps each, every mode; each rank's
    buffers after every step, and what every rank holds inside consolidated()."""
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    out = {}
    for mode in ("ddp", "allreduce", "overlap"):
        sync = make_sync(mode, _bn_model(), env)
        optimizer = torch.optim.SGD(sync.model.parameters(), lr=0.1, momentum=0.9)
        after_step = []
        for step in range(3):
            for micro in range(2):
                g = torch.Generator().manual_seed(100 * rank + 10 * step + micro)
                x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64) * (1 + rank)
                y = torch.randint(3, (4,), generator=g)
                with sync.no_sync() if micro == 0 else nullcontext():
                    nn.functional.cross_entropy(sync.model(x), y).backward()
            sync.finish_backward()
            optimizer.step()
            optimizer.zero_grad()
            after_step.append([b.clone() for b in unwrap(sync.model).buffers()])
        with sync.consolidated(optimizer):
            consolidated = [b.clone() for b in unwrap(sync.model).buffers()]
            params = _digest(unwrap(sync.model).parameters())
        out[mode] = {"after_step": after_step, "consolidated": consolidated, "params": params}
    return out


def _local_sgd_consolidated(rank: int, world_size: int) -> dict:
    """Two steps alone (K=3), then consolidated(): the average inside, the replica after."""
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    torch.manual_seed(0)
    sync = make_sync("local-sgd", build_model("mlp", 1, 4, 3), env, sync_every=3)
    optimizer = torch.optim.SGD(sync.model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * rank + step)
        x, y = torch.randn(5, 1, 4, 4, generator=g), torch.randint(3, (5,), generator=g)
        nn.functional.cross_entropy(sync.model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sync.after_step(optimizer)
    before = _digest(sync.replica_state(optimizer))
    with sync.consolidated(optimizer):
        inside = _digest(sync.replica_state(optimizer))
    return {"before": before, "inside": inside, "after": _digest(sync.replica_state(optimizer))}


def _rng_round_trip(rank: int, world_size: int, root: str) -> dict:
    """Each rank's own generators are saved (rank 0 writes the file) and restored."""
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    torch.manual_seed(1000 + rank)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    args = train_ddp.parse_args(["--batch-size", "4"])
    manager = CheckpointManager(Path(root) / "rng", keep=1, env=env)
    state = training_state(
        model, optimizer, scheduler, None, epoch=0, step=1, step_in_epoch=1,
        world_size=world_size, args=args,
    )  # fmt: skip
    manager.save(state)
    expected = torch.rand(3)  # what this rank draws next
    torch.rand(7)  # move on
    manager.resume("auto", args, model, optimizer, scheduler, None)
    return {"expected": expected, "after_resume": torch.rand(3)}


def _not_a_member(rank: int, world_size: int) -> torch.Tensor:
    group = dist.new_group([0, 1])  # every rank must call new_group, members or not
    t = torch.full((5,), float(rank + 1))
    communicate([t], functools.partial(dist.all_reduce, group=group), average=True)
    return t


# Local SGD (K=3) through the training script: 10 steps; the same with a checkpoint every 2
# steps and an evaluation after each epoch; and 5 steps, stop, resume to 10 (step 5 falls
# between two averages, so the resume needs each rank's replica).
LOCAL_SGD = [
    "--sync", "local-sgd", "--sync-every", "3", "--train-size", "96", "--eval-size", "9",
    "--batch-size", "4", "--epochs", "2", "--max-steps", "10", "--log-every", "1000",
]  # fmt: skip
# resnet18 (BatchNorm), one step: every rank's running statistics moved with its own batch.
RESNET = [
    "--model", "resnet18", "--train-size", "12", "--eval-size", "7", "--batch-size", "4",
    "--epochs", "1", "--dtype", "float64", "--log-every", "1000",
]  # fmt: skip


def _world(rank: int, world_size: int, root: str) -> dict:
    out: dict = {
        "buffers": _buffer_timing(rank, world_size),
        "local_sgd_block": _local_sgd_consolidated(rank, world_size),
        "rng": _rng_round_trip(rank, world_size, root),
        "not_a_member": _not_a_member(rank, world_size),
    }
    runs = {
        "straight": ["--no-eval"],
        "saving": ["--save-every", "2", "--keep", "20"],
        "first_half": ["--no-eval", "--max-steps", "5"],
    }
    for name, flags in runs.items():
        train_ddp.main([*LOCAL_SGD, "--out-dir", f"{root}/{name}", *flags])
    train_ddp.main([*LOCAL_SGD, "--out-dir", f"{root}/first_half", "--no-eval", "--resume", "auto"])
    out["resnet"] = train_ddp.main([*RESNET, "--out-dir", f"{root}/resnet"])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("rank-state")
    return run_world(_world, WORLD, str(root), timeout=150), root


@pytest.mark.oracle
def test_hand_made_modes_broadcast_buffers_when_ddp_does(world):
    # Float64, and the buffers depend on the parameters only through BatchNorm's input:
    # the modes' parameters differ by summation-order rounding (~1e-16 relative, 3 steps),
    # far below 1e-12. Broadcasting at every micro-step instead, as DDP does not, puts
    # rank 0's statistics of the first micro-batch into ranks 1 and 2: an O(1) difference
    # (their inputs are scaled by 1 + rank).
    ranks, _ = world
    for r, per_rank in enumerate(ranks):
        for mode in ("allreduce", "overlap"):
            for step, (mine, ddp) in enumerate(
                zip(
                    per_rank["buffers"][mode]["after_step"],
                    per_rank["buffers"]["ddp"]["after_step"],
                    strict=True,
                )
            ):
                for a, b in zip(mine, ddp, strict=True):
                    assert torch.allclose(a, b, rtol=0, atol=1e-12), (mode, r, step)


@pytest.mark.oracle
def test_every_rank_evaluates_and_saves_rank_0s_buffers(world):
    ranks, _ = world
    for mode in ("ddp", "allreduce", "overlap"):
        last = [r["buffers"][mode]["after_step"][-1][0] for r in ranks]  # running means
        assert not torch.equal(last[0], last[1]), "ranks' statistics never differed: vacuous"
        inside = [r["buffers"][mode]["consolidated"] for r in ranks]
        for other in inside[1:]:
            assert all(torch.equal(a, b) for a, b in zip(inside[0], other, strict=True)), mode
        assert len({r["buffers"][mode]["params"] for r in ranks}) == 1


@pytest.mark.oracle
def test_summary_eval_is_the_saved_models_eval(world):
    # One process evaluates the checkpoint on the same 7 samples: float64, the same model
    # and buffers, sums over other batch boundaries (~1e-15 relative). Each rank using its
    # own statistics (the bug) moved the loss by ~1e-2 relative in the measurement.
    ranks, root = world
    summary = ranks[0]["resnet"]
    assert summary["eval_samples"] == 7
    state = load_checkpoint(root / "resnet" / "checkpoint.pt")
    model = build_model("resnet18", 3, 32, 10).double()
    model.load_state_dict(state["model"])
    data = build_datasets("synthetic", None, seed=0, train_size=12, eval_size=7)
    loader = eval_loader(data.eval, 4, rank=0, world_size=1, workers=0, pin_memory=False)
    metrics = evaluate(model, loader, torch.device("cpu"), torch.float64)
    assert metrics["loss"] == pytest.approx(summary["eval_loss"], rel=1e-12, abs=0)


def test_local_sgd_consolidated_averages_only_inside_the_block(world):
    ranks, _ = world
    blocks = [r["local_sgd_block"] for r in ranks]
    assert len({b["before"] for b in blocks}) == WORLD, "replicas should differ after 2 steps"
    assert len({b["inside"] for b in blocks}) == 1
    assert all(b["after"] == b["before"] for b in blocks), "a replica was not restored"


def test_local_sgd_checkpoints_and_eval_leave_the_trajectory_alone(world):
    _, root = world
    straight = load_checkpoint(root / "straight" / "checkpoint.pt")
    assert straight["step"] == 10
    # Step 10 falls between averages (9 and 12): the file holds every rank's own replica,
    # and its model is their average.
    replicas = [r["replica"] for r in straight["ranks"]]
    assert len(replicas) == WORLD and len({_digest(r) for r in replicas}) == WORLD
    for name in ("saving", "first_half"):  # saved (and evaluated) on the way; resumed at 5
        other = load_checkpoint(root / name / "checkpoint.pt")
        assert other["step"] == 10, name
        assert _digest(other["model"].values()) == _digest(straight["model"].values()), name
        for mine, theirs in zip(other["ranks"], straight["ranks"], strict=True):
            assert _digest(mine["replica"]) == _digest(theirs["replica"]), name
    kept = sorted(p.name for p in (root / "saving" / "checkpoints").iterdir())
    assert "step-00000004.pt" in kept and "step-00000006.pt" in kept


def test_each_rank_resumes_its_own_generators(world):
    ranks, _ = world
    draws = [r["rng"] for r in ranks]
    assert len({tuple(d["expected"].tolist()) for d in draws}) == WORLD  # all different
    for d in draws:
        assert torch.equal(d["after_resume"], d["expected"])


def test_communicate_leaves_non_members_alone(world):
    ranks, _ = world
    assert torch.equal(ranks[0]["not_a_member"], torch.full((5,), 1.5))
    assert torch.equal(ranks[1]["not_a_member"], torch.full((5,), 1.5))
    assert torch.equal(ranks[2]["not_a_member"], torch.full((5,), 3.0))  # not negated


def test_cuda_rng_is_this_processs_devices_only(monkeypatch):
    """No GPU is touched: torch.cuda's RNG functions are replaced by fakes that record."""
    generators = {i: torch.tensor([i], dtype=torch.uint8) for i in range(8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: generators[d.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append((d.index, s)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all GPUs saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("all restored"))
    state = rng_state([torch.device("cuda", 5)])  # rank 5 of an 8-GPU node
    assert [t.item() for t in state["cuda"]] == [5]
    set_rng_state(state, [torch.device("cuda", 1)])  # resumed as rank 1 of a 2-GPU node
    assert [(i, s.item()) for i, s in restored] == [(1, 5)]
    restored.clear()
    set_rng_state({**state, "cuda": list(generators.values())}, [torch.device("cuda", 0)])
    assert restored == []  # saved for another number of devices: left as seeded
    assert "cuda" not in rng_state([torch.device("cpu")])  # a CPU rank asks CUDA nothing


def test_process_group_is_destroyed_on_a_clean_exit_only(monkeypatch):
    # The error in a world of two sets the flag that makes run_cli end the process with
    # os._exit; monkeypatch puts it back afterwards, or every later in-process run_cli call
    # of the session that reports an error would end pytest itself.
    monkeypatch.setattr(core_errors, "_group_left_alive", False)
    calls = []
    env = DistEnv(0, 0, 2, 2, "gloo", torch.device("cpu"))
    monkeypatch.setattr(comm_dist, "resolve", lambda backend=None: env)
    monkeypatch.setattr(comm_dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(comm_dist.dist, "init_process_group", lambda **kw: calls.append("init"))
    monkeypatch.setattr(comm_dist.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with comm_dist.distributed():
        pass
    assert calls == ["init", "destroy"]
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"), comm_dist.distributed():
        raise RuntimeError("boom")  # peers may be inside a collective: leave the group be
    assert calls == ["init"] and core_errors._group_left_alive
    calls.clear()
    monkeypatch.setattr(
        comm_dist, "resolve", lambda backend=None: DistEnv(0, 0, 1, 1, "gloo", env.device)
    )
    with pytest.raises(RuntimeError, match="boom"), comm_dist.distributed():
        raise RuntimeError("boom")  # a world of one has no peers: nothing left behind
    assert calls == ["init", "destroy"]


def test_train_ddp_main_destroys_the_group_on_a_clean_exit_only(monkeypatch):
    """train_ddp.py spells out what `distributed()` does: the same three cases, and a group
    made by someone else (a test harness, a notebook) is used and left alone."""
    monkeypatch.setattr(core_errors, "_group_left_alive", False)  # as in the test above
    calls, outcome = [], {}
    env = DistEnv(0, 0, 2, 2, "gloo", torch.device("cpu"))
    initialized = [False]

    def train(args, env, devices):
        calls.append("train")
        if "error" in outcome:
            raise outcome["error"]
        return {"devices": devices}

    monkeypatch.setattr(train_ddp, "resolve", lambda backend=None: env)
    monkeypatch.setattr(train_ddp, "train", train)
    monkeypatch.setattr(train_ddp.dist, "is_initialized", lambda: initialized[0])
    monkeypatch.setattr(train_ddp.dist, "init_process_group", lambda **kw: calls.append("init"))
    monkeypatch.setattr(train_ddp.dist, "destroy_process_group", lambda: calls.append("destroy"))
    assert train_ddp.main([]) == {"devices": [env.device]}
    assert calls == ["init", "train", "destroy"]
    calls.clear()
    outcome["error"] = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        train_ddp.main([])  # peers may be inside a collective: leave the group be
    assert calls == ["init", "train"] and core_errors._group_left_alive
    calls.clear()
    env = DistEnv(0, 0, 1, 1, "gloo", env.device)
    with pytest.raises(RuntimeError, match="boom"):
        train_ddp.main([])  # a world of one has no peers: nothing left behind
    assert calls == ["init", "train", "destroy"]
    calls.clear()
    initialized[0] = True
    with pytest.raises(RuntimeError, match="boom"):
        train_ddp.main([])  # someone else's group: neither made nor destroyed here
    assert calls == ["train"]


@pytest.mark.parametrize(
    "first,second,message",
    [
        (
            [],
            ["--sync", "local-sgd", "--sync-every", "3"],
            "--sync ddp (this run: local-sgd --sync-every 3)",
        ),
        (
            ["--sync", "local-sgd"],
            ["--sync", "local-sgd", "--sync-every", "2"],
            "--sync local-sgd --sync-every 4 (this run: local-sgd --sync-every 2)",
        ),
        (["--sync", "allreduce"], [], "--sync allreduce (this run: ddp)"),
    ],
)
def test_resume_refuses_another_sync_mode(tmp_path, first, second, message):
    common = ["--train-size", "64", "--eval-size", "4", "--batch-size", "8", "--max-steps", "2",
              "--no-eval", "--out-dir", str(tmp_path)]  # fmt: skip
    train_ddp.main([*common, *first])
    with pytest.raises(UsageError, match="written with") as error:
        train_ddp.main([*common, *second, "--resume", "auto"])
    assert message in str(error.value)
