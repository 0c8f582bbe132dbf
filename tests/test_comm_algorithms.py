"""The hand-made binomial-tree and recursive halving/doubling all-reduces (comm/algorithms.py)
against `dist.all_reduce` and against their byte formulas.

One spawn of 5 ranks; world sizes 2, 3 and 4 run as subgroups of it (ranks 0..W-1), and
W = 3 once more on ranks 1, 3, 4 so that group ranks and global ranks differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from comm.algorithms import (
    rhd_all_reduce,
    rhd_bytes_sent_by_rank,
    tree_all_reduce,
    tree_bytes_sent_by_rank,
)
from comm.ring import chunk_bounds
from tests.multiproc import run_world

WORLD = 5
GROUPS = {2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3, 4], "3'": [1, 3, 4]}
# 0 and 1, W-1 for every W, primes, a power of two, up to 1e5 (W does not divide most).
SIZES = [0, 1, 2, 3, 4, 7, 13, 97, 1024, 4099, 65537, 99991, 100000]
ALGORITHMS = {"tree": tree_all_reduce, "rhd": rhd_all_reduce}
FORMULAS = {"tree": tree_bytes_sent_by_rank, "rhd": rhd_bytes_sent_by_rank}


def _checks(rank: int, world_size: int) -> dict:
    out = {}
    for name, members in GROUPS.items():
        group = dist.new_group(members)  # every rank takes part in creating every group
        if rank not in members:
            continue
        me = members.index(rank)
        rows = []
        for n in SIZES:
            g = torch.Generator().manual_seed(1000 * n + rank)
            data = torch.randint(-(2**40), 2**40, (n,), generator=g)  # int64: exact sums
            want = data.clone()
            dist.all_reduce(want, group=group)
            row = {"n": n}
            for algo, fn in ALGORITHMS.items():
                got = data.clone()
                traffic = fn(got, group=group)
                row[algo] = (torch.equal(got, want), traffic.sent, traffic.received)
            rows.append(row)
        # A non-contiguous tensor is reduced in place: each rank holds (me + 1) x t.
        w = len(members)
        for algo, fn in ALGORITHMS.items():
            t = torch.arange(12).view(3, 4).t() * (me + 1)
            fn(t, group=group)
            rows.append({algo: torch.equal(t, torch.arange(12).view(3, 4).t() * w * (w + 1) // 2)})
        out[name] = (me, rows)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_world(_checks, WORLD, timeout=120)


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(GROUPS))
def test_algorithms_equal_dist_all_reduce_on_integers(results, name):
    for result in (r for r in results if name in r):
        _, rows = result[name]
        for row in rows:
            for algo in ALGORITHMS:
                if algo in row:
                    exact = row[algo] if isinstance(row[algo], bool) else row[algo][0]
                    assert exact, (name, algo, row.get("n", "non-contiguous"))


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(GROUPS))
def test_algorithms_send_their_formula(results, name):
    w = len(GROUPS[name])
    per_rank = sorted(r[name] for r in results if name in r)  # by group rank
    assert [me for me, _ in per_rank] == list(range(w))
    for i, n in enumerate(SIZES):
        for algo, formula in FORMULAS.items():
            sent = [rows[i][algo][1] for _, rows in per_rank]
            received = [rows[i][algo][2] for _, rows in per_rank]
            assert sent == formula(n, 8, w), (name, algo, n)
            assert sum(received) == sum(sent)  # every byte sent is received once


@pytest.mark.parametrize("w", [2, 3, 4, 5, 6, 7, 8, 12, 16])
def test_byte_formulas_closed_forms(w):
    """The per-rank formulas against the totals the algorithms' descriptions give."""
    p = 1 << (w.bit_length() - 1)
    extra = w - p
    for n in [0, 1, w - 1, 97, p * 1000]:
        tree = tree_bytes_sent_by_rank(n, 4, w)
        # Each non-root sends S up and receives S down: 2(W-1) tensors in all; the root sends
        # one to each of its ceil(lg W) children.
        assert sum(tree) == 2 * (w - 1) * n * 4
        assert tree[0] == (w - 1).bit_length() * n * 4
        rhd = rhd_bytes_sent_by_rank(n, 4, w)
        sizes = [b - a for a, b in chunk_bounds(n, p)]
        # The p participants each receive all of the tensor but their own chunk in each phase,
        # so together they send 2(p-1) x S; the fold adds 2 x S per folded pair.
        assert sum(rhd) == 4 * (2 * (p - 1) * n + 2 * extra * n)
        assert sum(sizes) == n
        if n % p == 0:
            phases = 2 * (p - 1) * n // p * 4
            assert rhd == [
                n * 4 if r < 2 * extra and r % 2 == 0 else phases + 4 * n * (r < 2 * extra)
                for r in range(w)
            ]
