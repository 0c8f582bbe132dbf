"""The sharded modes: ZeRO-1/2/3 by hand (comm/zero*.py) and torch's twins (torch-zero1, fsdp2).

One world per world size W = 2, 3, 4 (2 and 3 marked slow) trains a small float64 model
for 3 optimizer steps with every mode, with SGD + momentum and with AdamW, with and without
--grad-accum 2, and hands back the final parameters, what each rank held (parallel/memory.py,
from the tensors' storages) and the collectives of one step (comm/tracer.py). The oracles:

- every mode reaches `ddp`'s parameters, and each hand-made mode its library twin's;
- optimizer state: exactly k x (this rank's owned elements), k = 1 (momentum) or 2 (AdamW);
  the owned elements are ceil(P/W) on every rank but the last ones, which hold the padding
  (never stepped, so it has no state): the sum over ranks is k x P;
- zero3: between steps the parameter storage is the per-unit slices, at most ceil(P/W) + one
  element per unit, and while training at most one gathered unit more;
- traffic: the collectives of one step and their payloads, exactly; the bytes each rank
  sends (the tracer's ring model) equal the formulas of docs/ddp-to-fsdp.md, plus the
  hand-made modes' used map (an int32 per parameter tensor, parallel/base.used_anywhere).
"""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from comm.ring import bus_factor
from comm.tracer import CommTracer
from core.dist import DistEnv
from parallel.factory import make_sync
from parallel.memory import optimizer_tensors, rank_memory, storage_bytes
from parallel.zero1 import shard_range
from tests.multiproc import PYTHON, run_cmd, run_world
from training.checkpoint import unwrap

MODES = ("ddp", "zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}
STEPS = 3
ELEMENT = 8  # bytes of a float64


def small_model() -> nn.Module:
    """Units of 140, 1267 and 32 elements, P = 1439: divisible by none of W = 2, 3, 4, so
    every world pads, and each unit pads differently."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(180, 7), nn.ReLU(), nn.Linear(7, 4)
    ).double()


UNITS = [140, 1267, 32]
P = sum(UNITS)
# The used map (parallel/base.used_anywhere): one int32 per parameter tensor, 6 of them.
USED_MAP = ("all_reduce", 6 * 4)


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(4, (4,), generator=g)


def train(rank: int, world_size: int, mode: str, optimizer: str, accum: int) -> dict:
    env = DistEnv(rank, rank, world_size, world_size, "gloo", torch.device("cpu"))
    sync = make_sync(mode, small_model(), env)
    opt = sync.make_optimizer(*OPTIMIZERS[optimizer])
    peak = [0]
    if mode == "zero3":
        params = [p for u in sync.units for p in (u.full, u.padded)]
        sync.on_gather = lambda: peak.__setitem__(0, max(peak[0], storage_bytes(params)))
    tracer, out = CommTracer(enabled=True), {}
    tracer.attach(sync.model)  # DDP's buckets are recorded from here on, the rest once started
    for step in range(STEPS):
        if step == STEPS - 1:
            first = len(tracer.events)
            tracer.start()
        for micro in range(accum):
            x, y = batch(rank, step, micro)
            with nullcontext() if micro == accum - 1 else sync.no_sync():
                (nn.functional.cross_entropy(sync.model(x), y) / accum).backward()
        sync.finish_backward()
        opt.step()
        if step == STEPS - 1:
            out["at_step"] = rank_memory(sync.model, opt)
            out["state_elements"] = sum(t.numel() for t in optimizer_tensors(opt))
        sync.after_step(opt)
        opt.zero_grad(set_to_none=True)
    tracer.stop()
    out["between_steps"] = rank_memory(sync.model, opt)
    events = tracer.events[first:]  # the last step's
    out["events"] = [(e.kind, e.bytes) for e in events]
    out["sent"] = sum(e.sent for e in events)
    out["peak_params"] = peak[0]
    with sync.consolidated(opt):
        out["params"] = {k: v.detach().clone() for k, v in unwrap(sync.model).state_dict().items()}
    return out


ALL = [(optimizer, accum) for optimizer in OPTIMIZERS for accum in (1, 2)]
FEW = [("adamw", 1), ("sgd", 2)]  # the default suite's W = 4: each optimizer, each accum


def world(rank: int, world_size: int, configs: list[tuple[str, int]]) -> dict:
    results = {}
    for optimizer, accum in configs:
        for mode in MODES:
            results[mode, optimizer, accum] = train(rank, world_size, mode, optimizer, accum)
    # On a host where torch's accelerator is CUDA, gloo ranks still compute fsdp2 on the CPU,
    # where the model and the batches are (fully_shard's default mesh would be CUDA's).
    with mock.patch("torch._C._get_accelerator", lambda: torch.device("cuda")):
        results["fsdp2 on a GPU host", *configs[0]] = train(rank, world_size, "fsdp2", *configs[0])
    dist.barrier()
    return results


# W = 4 in the default suite (P = 1439 leaves 3 elements of padding); 2 and 3 with `slow`.
@pytest.fixture(
    scope="module",
    params=[pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 4],
)
def ranks(request) -> tuple[int, list[dict]]:
    configs = FEW if request.param == 4 else ALL
    return request.param, run_world(world, request.param, configs, timeout=120)


# Error model: each mode averages the same float64 gradients as DDP, summed in another order
# (one bucket, per unit, reduce-scatter against all-reduce), and AdamW and SGD are elementwise,
# so stepping a slice computes what stepping the whole tensor does. Each step's update then
# differs by a few units of float64 roundoff (1.1e-16) relative; AdamW divides by
# sqrt(v) + eps, which amplifies a relative gradient error by at most ~1 per step. After 3
# steps (parameters |p| < 1) the largest difference over every mode, optimizer, --grad-accum
# and W = 2, 3, 4 measured 5.6e-17, under ATEN_CPU_CAPABILITY=default and avx2 alike (the
# small model has no max-pool, and its ReLUs are ~1e-2 from a tie). 1e-10 leaves 10^6 of
# headroom, while bugs injected by hand land 10^8 above it at W = 3: zero1's gradient summed
# but not divided by W 7.2e-2; zero3 reducing only the last of two micro-batches 1.8e-2.
TOLERANCE = 1e-10


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.oracle
def test_every_sharded_mode_reaches_ddps_parameters(ranks):
    world_size, results = ranks
    configs = {(optimizer, accum) for _, optimizer, accum in results[0]}
    for optimizer, accum in configs:
        ddp = results[0]["ddp", optimizer, accum]["params"]
        moved = max_diff(ddp, small_model().state_dict())
        assert moved > 1e-3, "training did not move the parameters"
        for mode in MODES[1:]:
            for r, rank in enumerate(results):
                mine = rank[mode, optimizer, accum]["params"]
                diff = max_diff(ddp, mine)
                assert diff <= TOLERANCE, f"W={world_size} {mode} {optimizer} x{accum} rank {r}"
        # The hand-made mode against its library twin, directly.
        for hand, library in [("zero1", "torch-zero1"), ("zero2", "fsdp2"), ("zero3", "fsdp2")]:
            diff = max_diff(
                results[0][hand, optimizer, accum]["params"],
                results[0][library, optimizer, accum]["params"],
            )
            assert diff <= TOLERANCE, f"W={world_size} {hand} vs {library} {optimizer}"


@pytest.mark.oracle
def test_fsdp2_computes_where_the_model_is_on_a_gpu_host(ranks):
    """The same run as on a CPU host, bit for bit: nothing moved to the (pretend) GPU."""
    _, results = ranks
    for rank in results:
        (key,) = [key for key in rank if key[0] == "fsdp2 on a GPU host"]
        got, want = rank[key]["params"], rank["fsdp2", *key[1:]]["params"]
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_optimizer_state_is_sharded_exactly(ranks):
    world_size, results = ranks
    configs = {(optimizer, accum) for _, optimizer, accum in results[0]}
    for optimizer, accum in configs:
        k = {"sgd": 1, "adamw": 2}[optimizer]
        for mode in ("zero1", "zero2"):
            held = [r[mode, optimizer, accum]["state_elements"] for r in results]
            owned = [shard_range(P, world_size, r)[2] for r in range(world_size)]
            assert held == [k * n for n in owned], f"{mode} {optimizer}"
            assert max(held) == k * math.ceil(P / world_size) and sum(held) == k * P
        held = [r["zero3", optimizer, accum]["state_elements"] for r in results]
        owned = [sum(shard_range(u, world_size, r)[2] for u in UNITS) for r in range(world_size)]
        assert held == [k * n for n in owned] and sum(held) == k * P, optimizer
        assert all(h <= k * (math.ceil(P / world_size) + len(UNITS)) for h in held)
        # DDP: every rank holds all of it.
        assert all(r["ddp", optimizer, accum]["state_elements"] == k * P for r in results)


@pytest.mark.oracle
def test_memory_per_mode_from_storages(ranks):
    world_size, results = ranks
    s = math.ceil(P / world_size)
    slices = sum(math.ceil(u / world_size) for u in UNITS)  # zero3: one padded slice per unit
    largest = max(world_size * math.ceil(u / world_size) for u in UNITS)
    for r, rank in enumerate(results):
        owned = shard_range(P, world_size, r)[2]
        ddp = rank["ddp", "adamw", 1]["at_step"]
        assert ddp == {"params": P * 8, "grads": P * 8, "optimizer": 2 * P * 8}
        zero1 = rank["zero1", "adamw", 1]["at_step"]
        flat = world_size * s * ELEMENT  # the flat buffers, padded to W x S
        assert zero1 == {"params": flat, "grads": flat, "optimizer": 2 * owned * ELEMENT}
        zero2 = rank["zero2", "adamw", 1]["at_step"]
        assert zero2 == {"params": flat, "grads": s * ELEMENT, "optimizer": 2 * owned * ELEMENT}
        zero3 = rank["zero3", "adamw", 1]
        assert zero3["at_step"]["params"] == slices * ELEMENT
        assert zero3["at_step"]["grads"] == slices * ELEMENT
        assert zero3["between_steps"]["params"] <= (s + len(UNITS)) * ELEMENT
        # While training: the slices, plus the unit being gathered, never two at once.
        assert slices * ELEMENT < zero3["peak_params"] <= (slices + largest) * ELEMENT
        # FSDP2 pads each parameter's first dimension, not each unit: close to 1/W, not exact.
        fsdp2 = rank["fsdp2", "adamw", 1]["between_steps"]
        assert fsdp2["params"] <= 2 * slices * ELEMENT


@pytest.mark.oracle
def test_traffic_per_step_is_the_formula(ranks):
    world_size, results = ranks
    w, s = world_size, math.ceil(P / world_size)
    ddp_bytes = P * ELEMENT
    for rank in results:
        ddp = rank["ddp", "adamw", 1]
        assert [kind for kind, _ in ddp["events"]] == ["all_reduce"]  # one bucket: P < 25 MiB
        assert ddp["events"][0][1] == ddp_bytes
        assert math.isclose(ddp["sent"], 2 * (w - 1) / w * ddp_bytes, rel_tol=1e-12)
        used_map = bus_factor("all_reduce", w) * USED_MAP[1]
        zero1 = rank["zero1", "adamw", 1]
        assert zero1["events"] == [
            ("all_reduce", ddp_bytes),
            USED_MAP,
            ("all_gather", w * s * ELEMENT),
        ]
        sent = bus_factor("all_reduce", w) * ddp_bytes + (w - 1) * s * ELEMENT + used_map
        assert math.isclose(zero1["sent"], sent, rel_tol=1e-12)
        zero2 = rank["zero2", "adamw", 1]
        assert zero2["events"] == [
            USED_MAP,
            ("reduce_scatter", w * s * ELEMENT),
            ("all_gather", w * s * ELEMENT),
        ]
        sent = 2 * (w - 1) * s * ELEMENT + used_map
        assert math.isclose(zero2["sent"], sent, rel_tol=1e-12)
        zero3 = rank["zero3", "adamw", 1]
        units = [w * math.ceil(u / w) * ELEMENT for u in UNITS]
        forward = [("all_gather", b) for b in units]
        assert zero3["events"][: len(UNITS)] == forward
        assert zero3["events"][-1] == USED_MAP  # after the last unit's reduce-scatter
        backward = sorted(zero3["events"][len(UNITS) : -1])
        assert backward == sorted(
            [("all_gather", b) for b in units] + [("reduce_scatter", b) for b in units]
        )
        sent = 3 * (w - 1) / w * sum(units) + used_map
        assert math.isclose(zero3["sent"], sent, rel_tol=1e-12)


@pytest.mark.slow
def test_benchmark_writes_table_csv_and_plot(tmp_path):
    result = run_cmd(
        [PYTHON, "-m", "benchmarks.bench_zero", "--rounds", "1", "--steps", "1", "--warmup", "1"]
        + ["--out-dir", str(tmp_path)],
        timeout=300,
        check=True,
    )
    with open(tmp_path / "bench_zero.csv", newline="") as f:
        rows = {r["mode"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(MODES)
    for mode in ("ddp", "zero1", "zero2", "zero3"):  # measured = predicted, byte for byte
        for kind in ("params", "grads", "optimizer"):
            assert float(rows[mode][kind]) == float(rows[mode][f"predicted_{kind}"]), (mode, kind)
        assert math.isclose(float(rows[mode]["sent"]), float(rows[mode]["predicted_sent"]))
    assert "zero3" in result.stdout and "vs ddp" in result.stdout
    assert (tmp_path / "bench_zero.png").read_bytes()[:4] == b"\x89PNG"
