"""The shared-memory all-reduce (comm/shm.py) against `dist.all_reduce`, and its hygiene.

One spawn of 4 ranks; worlds of 2, 3 and 4 run as subgroups (ranks 0..W-1) and W = 2 once
more on ranks 1 and 3, so that group ranks and global ranks differ. Integers make the oracle
exact whatever the order of the additions; float64 is exact at 2 ranks (one addition, which
commutes) and, at 3+, on values whose sums are exact (small integers as floats).
"""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from comm.communicate import communicate
from comm.shm import SHM_DIR, ShmWorld, shm_all_reduce
from tests.multiproc import WorldFailed, run_world

WORLD = 4
GROUPS = {2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3], "2'": [1, 3]}
SIZES = [0, 1, 2, 3, 7, 97, 4099, 65537, 300_001]  # around W, primes, past one 1 MiB slot
DTYPES = [torch.int64, torch.int32, torch.int8, torch.float64, torch.float32, torch.bfloat16]


def _data(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:  # small integers: every partial sum is exact in any order
        return torch.randint(-8, 8, (n,), generator=g).to(dtype)
    info = torch.iinfo(dtype)
    high = min(info.max // WORLD, 2**40)
    return torch.randint(-high, high, (n,), generator=g, dtype=torch.int64).to(dtype)


def _checks(rank: int, world_size: int) -> dict:
    out = {}
    for name, members in GROUPS.items():
        group = dist.new_group(members)
        if rank not in members:
            continue
        world = ShmWorld(group)
        rows = []
        for n in SIZES:
            for dtype in DTYPES:
                data = _data(n, dtype, 1000 * n + 10 * rank + DTYPES.index(dtype))
                want = data.clone()
                dist.all_reduce(want, group=group)
                got = data.clone()
                world.all_reduce(got, group=group)
                rows.append((n, str(dtype), torch.equal(got, want)))
        # random float64 at 2 ranks: a + b == b + a, so gloo's bits exactly
        if len(members) == 2:
            x = torch.randn(
                10_001, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)
            )
            want, got = x.clone(), x.clone()
            dist.all_reduce(want, group=group)
            world.all_reduce(got, group=group)
            rows.append(("randn", "float64", torch.equal(got, want)))
        # non-contiguous input, reduced in place: each rank holds (me + 1) x t
        me, w = members.index(rank), len(members)
        t = torch.arange(12.0).view(3, 4).t() * (me + 1)
        world.all_reduce(t, group=group)
        rows.append(
            (
                "strided",
                "float32",
                torch.equal(t, torch.arange(12.0).view(3, 4).t() * w * (w + 1) // 2),
            )
        )
        # a buffer living in shared memory: no copy in or out
        slot = world.input_slot(5, torch.int64)
        slot.copy_(torch.arange(5) * (me + 1))
        total = world.reduce_in_place(5, torch.int64)
        rows.append(("in place", "int64", torch.equal(total, torch.arange(5) * w * (w + 1) // 2)))
        # through communicate(), averaging: divides by the group's size
        grads = [torch.full((3, 2), float(me + 1)), torch.full((7,), 2.0 * (me + 1))]
        communicate(grads, world.op(), average=True)
        mean = (w + 1) / 2
        rows.append(("communicate", "float32", torch.equal(grads[0], torch.full((3, 2), mean))))
        out[name] = rows
    dist.barrier()
    leftovers = glob.glob(os.path.join(SHM_DIR, "ddp-shm-*"))
    one_call = torch.full((4,), float(rank))
    shm_all_reduce(one_call)
    return {"groups": out, "leftovers": leftovers, "one_call": one_call.tolist()}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_world(_checks, WORLD, timeout=240)


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(GROUPS))
def test_equals_dist_all_reduce(results, name):
    rows = [row for r in results for row in r["groups"].get(name, [])]
    assert rows, name
    bad = [row for row in rows if not row[2]]
    assert not bad, bad


def test_nothing_is_left_in_dev_shm(results):
    """Every buffer's name is unlinked once mapped: nothing to clean up on any exit path."""
    assert all(r["leftovers"] == [] for r in results)
    assert all(r["one_call"] == [6.0] * 4 for r in results)  # 0 + 1 + 2 + 3


def _dies(rank: int, world_size: int) -> None:
    world = ShmWorld(deadline_s=5)
    x = torch.ones(8)
    world.all_reduce(x)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a rank lost in the middle of the job
    tic = time.perf_counter()
    try:
        world.all_reduce(x)
    except RuntimeError as e:
        return {"error": str(e), "after_s": time.perf_counter() - tic}
    return {"error": None}


def test_a_lost_rank_ends_the_wait_and_leaves_nothing():
    with pytest.raises(WorldFailed) as failed:
        run_world(_dies, 2, timeout=60)
    assert "rank 1" in str(failed.value)
    assert glob.glob(os.path.join(SHM_DIR, "ddp-shm-*")) == []
