"""A parameter that gets no gradient, in every --sync mode: not stepped, its optimizer state
untouched, as in one process (parallel/base.used_anywhere, parallel/zero1.ShardOptimizer,
DDP's find_unused_parameters).

One world per W = 2 and 3 trains `Net` for 5 steps in float64 with every mode, under SGD with
momentum and weight decay and under AdamW with weight decay, through the repository's own
strategy objects (parallel.factory.make_sync, sync.make_optimizer). The model has

- `unused`: a layer never called (it must not move: AdamW's weight decay would move it);
- `branch`: called by some ranks only, or by none, depending on the step (`USERS`);
- `mid`: frozen with requires_grad_(False) after FREEZE_AT steps.

The oracle is one process training the same global batch (the ranks' batches concatenated,
the branch applied to the rows of the ranks that call it): every mode reaches its parameters
within TOLERANCE, holds optimizer state for the same parameters with the same Adam step
counts, and leaves `grad is None` after the sync exactly where one process has None. DDP with
find_unused_parameters=True meets the same oracle, which shows how DDP averages a gradient
that only some ranks have: their sum, zeros from the others, divided by W.
local-sgd: with K = 1 and plain SGD it is that same computation; with K larger than the run,
each rank equals one process training on its own batches alone (a rank steps only the
parameters it has a gradient for).
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from core.dist import DistEnv
from core.errors import UsageError
from parallel.factory import add_sync_flags, ddp_kwargs, make_sync
from tests.multiproc import run_world
from training.checkpoint import unwrap

STEPS = 5
FREEZE_AT = 2  # `mid` is trained in steps 0 and 1, frozen from step 2 on
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
    "plain-sgd": (torch.optim.SGD, dict(lr=0.1)),
}
MODES = ("ddp", "allreduce", "overlap", "zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
WATCHED = ("unused.weight", "branch.weight", "branch.bias", "mid.weight", "head.weight")
ROWS = 4  # per rank


def users(step: int, world_size: int, ragged: bool = True) -> set[int]:
    """The ranks whose forward calls `branch` at `step`: one rank, none, all, another one,
    none. Steps 1 and 4: no gradient anywhere; steps 0 and 3: on some ranks only. Not
    `ragged`: every rank where the ragged table has one (what zero3 and fsdp2 can run)."""
    everyone = set(range(world_size))
    use = [{0}, set(), everyone, {world_size - 1}, set()][step]
    return use if ragged or not use else everyone


# zero3 and fsdp2 gather each unit's parameters with a collective when its module runs (and
# again in its backward): every rank must run the same modules in the same order, as FSDP
# requires, so a branch that some ranks take and others skip hangs in that all-gather (with
# the table below at W = 2 both stop at the first step: zero3 a gloo timeout, fsdp2 a
# connection reset). They are held to the same oracle with the branch taken by every rank or
# by none.
RAGGED = {mode: mode not in ("zero3", "fsdp2") for mode in MODES}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.branch = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`rows`: which rows get the branch's output added; None: the branch is not called."""
        h = torch.tanh(self.mid(torch.tanh(self.trunk(x))))  # smooth: no kink to round across
        y = self.head(h)
        if rows is not None:
            y = y + torch.where(rows[:, None], self.branch(h), 0.0)
        return y


def fresh() -> Net:
    torch.manual_seed(0)
    return Net().double()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(ROWS, 6, generator=g, dtype=torch.float64)
    return x, torch.randn(ROWS, 3, generator=g, dtype=torch.float64)


def inputs(ranks: list[int], step: int, world_size: int, ragged: bool):
    """The batches of `ranks`, concatenated, and the rows that call the branch (None: none)."""
    xs, ys = zip(*(batch(r, step) for r in ranks), strict=True)
    use = users(step, world_size, ragged)
    rows = torch.tensor([r in use for r in ranks for _ in range(ROWS)])
    return torch.cat(xs), torch.cat(ys), rows if rows.any() else None


def freeze(model: nn.Module) -> None:
    for p in model.mid.parameters():
        p.requires_grad_(False)


def optimizer_view(sync, optimizer, mode: str) -> list[tuple[str, torch.Tensor, dict]]:
    """(name, what the optimizer steps for that parameter, its state), for WATCHED: the
    parameter itself, or in zero1/2/3 this rank's piece of it (parallel/zero1.py)."""
    model = unwrap(sync.model)
    names = {id(p): n for n, p in model.named_parameters()}
    inner = getattr(optimizer, "optim", optimizer)  # ShardOptimizer, ZeroRedundancyOptimizer
    if mode in ("zero1", "zero2"):
        pairs = list(zip(sync.params, sync.pieces, strict=True))
    elif mode in ("zero3", "hsdp"):
        pairs = [(p, x) for u in sync.units for p, x in zip(u.params, u.pieces, strict=True)]
    else:
        pairs = [(p, p) for p in model.parameters()]
    return [
        (names[id(p)], key, inner.state.get(key, {})) for p, key in pairs if names[id(p)] in WATCHED
    ]


def summary(view: list[tuple[str, torch.Tensor, dict]]) -> dict[str, object]:
    """Which watched parameters have optimizer state, and their Adam step counts."""
    return {
        name: float(state["step"]) if "step" in state else "momentum"
        for name, _, state in view
        if state
    }


def train(
    rank: int,
    world_size: int,
    mode: str,
    optimizer: str,
    ragged: bool,
    sync_every=None,
    topology: str | None = None,
) -> dict:
    """`topology`: hsdp's and torch-hsdp's layout (tests/test_parallel_hsdp.py)."""
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    options = {"find_unused_parameters": True} if mode in ("ddp", "torch-zero1") else {}
    if mode == "local-sgd":
        options["sync_every"] = sync_every
    if topology is not None:
        options["topology"] = topology
    sync = make_sync(mode, fresh(), env, **options)
    opt = sync.make_optimizer(*OPTIMIZERS[optimizer])
    none_after_sync = []
    for step in range(STEPS):
        if step == FREEZE_AT:
            freeze(unwrap(sync.model))
        x, y, rows = inputs([rank], step, world_size, ragged)
        nn.functional.mse_loss(sync.model(x, rows), y).backward()
        sync.finish_backward()
        view = optimizer_view(sync, opt, mode)
        none_after_sync.append({name: key.grad is None for name, key, _ in view})
        opt.step()
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
    out = {"none": none_after_sync, "state": summary(optimizer_view(sync, opt, mode))}
    if mode == "local-sgd" and sync_every > STEPS:
        model = sync.model  # this rank's own replica: consolidated() would average them
        out["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return out
    with sync.consolidated(opt):
        model = unwrap(sync.model)
        out["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def one_process(ranks: list[int], world_size: int, optimizer: str, ragged: bool = True) -> dict:
    """The oracle: one process training on the batches of `ranks`, concatenated."""
    model = fresh()
    cls, kwargs = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **kwargs)
    none = []
    for step in range(STEPS):
        if step == FREEZE_AT:
            freeze(model)
        x, y, rows = inputs(ranks, step, world_size, ragged)
        nn.functional.mse_loss(model(x, rows), y).backward()
        view = [(n, p, opt.state.get(p, {})) for n, p in model.named_parameters() if n in WATCHED]
        none.append({name: p.grad is None for name, p, _ in view})
        opt.step()
        opt.zero_grad(set_to_none=True)
    view = [(n, p, opt.state.get(p, {})) for n, p in model.named_parameters() if n in WATCHED]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"none": none, "state": summary(view), "params": params}


def world(rank: int, world_size: int) -> dict:
    everyone = list(range(world_size))
    results = {}
    for optimizer in ("sgd", "adamw"):
        for ragged in (True, False):
            results["one", optimizer, ragged] = one_process(everyone, world_size, optimizer, ragged)
        results["alone", optimizer] = one_process([rank], world_size, optimizer)
        for mode in MODES:
            results[mode, optimizer] = train(rank, world_size, mode, optimizer, RAGGED[mode])
        never = train(rank, world_size, "local-sgd", optimizer, True, sync_every=100)
        results["local-sgd-never", optimizer] = never
    results["one", "plain-sgd", True] = one_process(everyone, world_size, "plain-sgd")
    one = train(rank, world_size, "local-sgd", "plain-sgd", True, sync_every=1)
    results["local-sgd-1", "plain-sgd"] = one
    dist.barrier()
    return results


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request) -> tuple[int, list[dict]]:
    return request.param, run_world(world, request.param, timeout=180)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Error model: every mode computes the one-process gradients of the same float64 inputs,
# summed in another order (per-rank means then an average, buckets, shards), so each step's
# gradient differs by a few float64 roundings (1.1e-16) relative; SGD, momentum and AdamW are
# elementwise, and AdamW's m / sqrt(v) carries a relative gradient error through about 1:1.
# No gradient element is near zero by cancellation in one run and exactly zero in the other:
# a missing gradient is an exact zero (or None) on both sides. Over 5 steps with lr <= 0.1
# the parameters agree to a few 1e-16: the largest difference over every mode, optimizer
# and W measured 6.7e-17 (W = 2) and 1.7e-16 (W = 3) under avx2 and avx512, under default
# 5.6e-17 and 2.4e-16 (the test prints it with -s). 1e-10 leaves 10^5 of headroom, while
# the bug guarded against lands far above it: zeros kept for the gradient no rank had
# (allreduce, or zero1's pieces all stepped) move the parameters 8.6e-2 from one process.
TOLERANCE = 1e-10


@pytest.mark.oracle
def test_every_mode_is_one_process(ranks):
    world_size, results = ranks
    worst = 0.0
    for optimizer in ("sgd", "adamw"):
        for ragged in (True, False):
            moved = max_diff(results[0]["one", optimizer, ragged]["params"], fresh().state_dict())
            assert moved > 1e-3, "training moved nothing"
        for mode in MODES:
            one = results[0]["one", optimizer, RAGGED[mode]]
            for r, rank in enumerate(results):
                diff = max_diff(one["params"], rank[mode, optimizer]["params"])
                worst = max(worst, diff)
                assert diff <= TOLERANCE, f"W={world_size} {mode} {optimizer} rank {r}: {diff}"
    one = results[0]["one", "plain-sgd", True]
    for r, rank in enumerate(results):
        diff = max_diff(one["params"], rank["local-sgd-1", "plain-sgd"]["params"])
        assert diff <= TOLERANCE, f"W={world_size} local-sgd K=1 rank {r}: {diff}"
    print(f"W={world_size}: largest difference from one process {worst:.2e}")


@pytest.mark.oracle
def test_local_sgd_rank_steps_only_its_own_gradients(ranks):
    world_size, results = ranks
    for optimizer in ("sgd", "adamw"):
        for r, rank in enumerate(results):
            alone, mine = rank["alone", optimizer], rank["local-sgd-never", optimizer]
            diff = max_diff(alone["params"], mine["params"])
            assert diff <= TOLERANCE, f"W={world_size} {optimizer} rank {r}: {diff}"
            assert mine["state"] == alone["state"], f"{optimizer} rank {r}"
            assert mine["none"] == alone["none"], f"{optimizer} rank {r}"


@pytest.mark.oracle
def test_unused_parameter_is_untouched_and_has_no_state(ranks):
    world_size, results = ranks
    start = fresh().state_dict()
    for optimizer in ("sgd", "adamw"):
        one = results[0]["one", optimizer, True]
        # The oracle itself: the unused layer never moves and never gets state; the branch
        # has an Adam step count of its own (the steps some rank called it in).
        assert torch.equal(one["params"]["unused.weight"], start["unused.weight"])
        assert "unused.weight" not in one["state"]
        if optimizer == "adamw":
            called = sum(bool(users(s, world_size)) for s in range(STEPS))
            assert one["state"]["branch.weight"] == called == 3
            assert one["state"]["mid.weight"] == FREEZE_AT
        for mode in MODES:
            one = results[0]["one", optimizer, RAGGED[mode]]
            for r, rank in enumerate(results):
                mine = rank[mode, optimizer]
                assert torch.equal(mine["params"]["unused.weight"], start["unused.weight"]), (
                    f"W={world_size} {mode} {optimizer} rank {r}"
                )
                if mode == "torch-zero1":  # each parameter's state lives on its owner only
                    assert set(mine["state"]) <= set(one["state"]), f"{mode} rank {r}"
                    assert all(mine["state"][k] == one["state"][k] for k in mine["state"])
                else:
                    assert mine["state"] == one["state"], f"W={world_size} {mode} {optimizer}"
                assert mine["none"] == one["none"], f"W={world_size} {mode} {optimizer} rank {r}"
        owned = set().union(*(rank["torch-zero1", optimizer]["state"] for rank in results))
        assert owned == set(one["state"]), f"torch-zero1 {optimizer}"


def test_find_unused_parameters_is_ddps_option_only():
    parser = argparse.ArgumentParser()
    add_sync_flags(parser.add_argument_group())
    assert ddp_kwargs(parser.parse_args(["--find-unused-parameters"])) == {
        "find_unused_parameters": True
    }
    assert ddp_kwargs(parser.parse_args([])) == {}
    env = DistEnv(0, 0, 1, 1, "gloo", torch.device("cpu"))
    for mode in ("allreduce", "overlap", "local-sgd", "zero1", "zero2", "zero3", "fsdp2"):
        # Refused before anything is built or communicated: no process group needed.
        with pytest.raises(UsageError, match="--find-unused-parameters is DDP's option"):
            make_sync(mode, fresh(), env, find_unused_parameters=True)
