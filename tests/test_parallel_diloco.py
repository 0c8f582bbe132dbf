"""--sync diloco (parallel/diloco.py) against its oracles, at 2 and 3 ranks, in float64.

- H = 1, outer lr 1, no outer momentum, plain SGD inside: the same steps as --sync allreduce
  (DDP's average of the gradients), within 1e-10.
- The outer step is torch's SGD(nesterov) applied to the averaged pseudo-gradient.
- Bytes: one all-reduce of the parameters every H steps, exactly 1/H of --sync allreduce's
  gradient bytes over the same steps (traced), half that with --outer-dtype bfloat16; the
  streaming variant sends the same total, at most ~1/F of it at a time.
- Resume: train_ddp.py stopped after 3 steps and resumed equals the straight 6-step run, bit
  for bit (the rank state holds each replica, its inner optimizer state and the outer state).

Error model of the 1e-10: each step's update is the same float64 average taken in another
order (theta_outer - theta_rank is lr x gradient up to one rounding of the subtraction), so
the parameters differ by a few ulps after these steps (|p| < 1: ~1e-16); a wrong average
(W - 1 for W, one rank left out) moves them by lr x |g| ~ 1e-3.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import train_ddp
from comm.tracer import CommTracer
from parallel.diloco import DiLoCoSync
from parallel.factory import make_sync
from tests.multiproc import run_world
from training.checkpoint import load_checkpoint

TOLERANCE = 1e-10
STEPS = 4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 5, (8,), generator=g
    )


def train(sync, model, steps: int, lr: float = 0.1) -> torch.optim.Optimizer:
    opt = sync.make_optimizer(torch.optim.SGD, {"lr": lr})
    for step in range(steps):
        x, y = batch(dist.get_rank(), step)
        nn.functional.cross_entropy(model(x), y).backward()
        sync.finish_backward()
        opt.step()
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
    return opt


def _checks(rank: int, world_size: int, out_root: str) -> dict:
    env = train_ddp.resolve("gloo")
    out: dict = {}
    # 1. H = 1, outer lr 1, no momentum == allreduce
    ref = net()
    train(make_sync("allreduce", ref, env), ref, STEPS)
    mine = net()
    plain = {"outer_lr": 1.0, "outer_momentum": 0.0}
    train(make_sync("diloco", mine, env, sync_every=1, diloco=plain), mine, STEPS)
    pairs = zip(ref.parameters(), mine.parameters(), strict=True)
    out["h1"] = max((a - b).abs().max().item() for a, b in pairs)
    # 2. the outer step is torch's SGD(nesterov) on the averaged pseudo-gradient
    model = net()
    sync = DiLoCoSync(model, sync_every=2, outer_lr=0.7, outer_momentum=0.9)
    opt = sync.make_optimizer(torch.optim.SGD, {"lr": 0.1})
    errors = []
    for step in range(6):
        x, y = batch(rank, step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if (step + 1) % 2 == 0:  # the outer step comes in after_step: do it by hand first
            outer = [o.clone() for o in sync.outer[0]]
            pairs = zip(outer, model.parameters(), strict=True)
            delta = torch.cat([(o - p).reshape(-1) for o, p in pairs])
            dist.all_reduce(delta)
            delta /= world_size
            twin = [o.clone().requires_grad_() for o in outer]
            twin_opt = torch.optim.SGD(twin, lr=0.7, momentum=0.9, nesterov=True)
            twin_opt.load_state_dict(copy.deepcopy(sync.outer_optimizers[0].state_dict()))
            offset = 0
            for t in twin:
                t.grad = delta[offset : offset + t.numel()].view_as(t).clone()
                offset += t.numel()
            twin_opt.step()
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 2 == 0:
            pairs = zip(twin, model.parameters(), strict=True)
            errors.append(max((t - p).abs().max().item() for t, p in pairs))
    out["nesterov"] = errors
    # 3. bytes against --sync allreduce over the same 4 steps
    traced = {}
    for name, mode, settings in [
        ("allreduce", "allreduce", None),
        ("diloco", "diloco", {}),
        ("diloco-bf16", "diloco", {"outer_dtype": torch.bfloat16}),
        ("streaming", "diloco", {"fragments": 2}),
    ]:
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 5))  # float32
        sync = make_sync(
            mode, model, env, sync_every=4 if settings is not None else None, diloco=settings
        )
        with CommTracer() as tracer:
            opt = sync.make_optimizer(torch.optim.SGD, {"lr": 0.1})
            per_step = []
            for step in range(4):
                x, y = batch(rank, step)
                nn.functional.cross_entropy(model(x.float()), y).backward()
                sync.finish_backward()
                opt.step()
                sync.after_step(opt)
                opt.zero_grad(set_to_none=True)
                per_step.append(tracer.end_step()["comm/bytes"])
        traced[name] = per_step
    out["bytes"] = traced
    out["param_bytes"] = sum(p.numel() * 4 for p in model.parameters())
    out["tensors"] = sum(1 for _ in model.parameters())
    # 4. resume through train_ddp.py: straight 6 steps vs 3, then 3 more
    common = [
        "--sync", "diloco", "--sync-every", "2", "--optimizer", "adamw", "--lr", "0.01",
        "--train-size", "192", "--eval-size", "4", "--batch-size", "8", "--epochs", "1",
        "--no-eval", "--log-every", "100", "--dtype", "float32", "--model", "mlp",
    ]  # fmt: skip
    root = Path(out_root)
    straight = train_ddp.main([*common, "--max-steps", "6", "--out-dir", str(root / "straight")])
    train_ddp.main([*common, "--max-steps", "3", "--out-dir", str(root / "resumed")])
    resumed = train_ddp.main(
        [*common, "--max-steps", "6", "--out-dir", str(root / "resumed"), "--resume", "auto"]
    )
    out["resume"] = (straight["param_checksum"], resumed["param_checksum"])
    if rank == 0:
        a = load_checkpoint(root / "straight" / "checkpoint.pt")
        b = load_checkpoint(root / "resumed" / "checkpoint.pt")
        out["resume_ranks_equal"] = all(
            torch.equal(x, y)
            for ra, rb in zip(a["ranks"], b["ranks"], strict=True)
            for x, y in zip(ra["diloco"]["replica"], rb["diloco"]["replica"], strict=True)
        )
    dist.barrier()
    return out


@pytest.fixture(
    scope="module",
    params=[pytest.param(2, id="w2"), pytest.param(3, id="w3", marks=pytest.mark.slow)],
)  # 3 ranks: about 20 s, with the slow tests
def results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    w = request.param
    root = tmp_path_factory.mktemp(f"diloco-w{w}")
    return w, run_world(functools.partial(_checks), w, str(root), timeout=300)


@pytest.mark.oracle
def test_h1_without_outer_momentum_is_allreduce(results):
    _, runs = results
    assert all(r["h1"] <= TOLERANCE for r in runs), [r["h1"] for r in runs]


@pytest.mark.oracle
def test_outer_step_is_torchs_nesterov_sgd(results):
    _, runs = results
    for r in runs:
        assert len(r["nesterov"]) == 3
        assert all(e <= 1e-15 for e in r["nesterov"]), r["nesterov"]


@pytest.mark.oracle
def test_bytes_are_one_hth_of_allreduce(results):
    _, runs = results
    b = runs[0]["bytes"]
    param_bytes = runs[0]["param_bytes"]
    used_map = 4 * runs[0]["tensors"]  # allreduce's int32 per tensor: which got a gradient
    assert b["allreduce"] == [param_bytes + used_map] * 4  # the gradients every step
    assert b["diloco"] == [0, 0, 0, param_bytes]  # the parameters' deltas every H = 4
    assert sum(b["diloco"]) * 4 == sum(b["allreduce"]) - 4 * used_map
    assert b["diloco-bf16"] == [0, 0, 0, param_bytes // 2]
    assert sum(b["streaming"]) == param_bytes and max(b["streaming"]) < param_bytes
    assert b["streaming"][0] == b["streaming"][2] == 0  # fragments at steps 2 and 4


def test_resume_is_bit_identical(results):
    _, runs = results
    assert all(r["resume"][0] == r["resume"][1] for r in runs)
    assert runs[0]["resume_ranks_equal"]
