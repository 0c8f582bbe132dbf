"""Pitfall: forgetting `sampler.set_epoch(epoch)`, so every epoch replays the same order.

    torchrun --standalone --nproc-per-node 2 pitfalls/set_epoch.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/set_epoch.py --right

DistributedSampler shuffles with a generator seeded by `seed + epoch`, and the sampler only
learns the epoch from `set_epoch()`. Forget the call and the epoch stays 0: every epoch
draws the identical permutation, so each rank sees the same samples in the same order every
time (no error, just a quietly worse model). The script hashes each epoch's index order on
every rank: the wrong run prints one hash repeated, the right run a different hash per epoch.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pitfalls import common


def epoch_orders(
    right: bool,
    epochs: int = 3,
    samples: int = 64,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[str]:
    """A short hash of the index order this rank sees in each epoch. `rank`, `world_size`:
    the group's by default; given, no group is needed (tests/doc_figures.py)."""
    dataset = TensorDataset(torch.arange(samples))
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    hashes = []
    for epoch in range(epochs):
        if right:
            sampler.set_epoch(epoch)  # the fix: one line at the top of every epoch
        order = torch.cat([indices for (indices,) in loader])
        hashes.append(hashlib.sha256(order.numpy().tobytes()).hexdigest()[:12])
    return hashes


def run(right: bool) -> dict:
    """Needs a process group. Returns rank 0's hashes and the number of distinct orders
    seen by any rank over all epochs (the wrong run: one per rank)."""
    hashes = epoch_orders(right)
    every_rank: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every_rank, hashes)
    return summary(every_rank)


def summary(every_rank: list[list[str]]) -> dict:
    """The RESULT line's values from each rank's hashes (rank 0's first)."""
    distinct = max(len(set(h)) for h in every_rank)
    return {"epochs": len(every_rank[0]), "distinct_orders": distinct, "orders": every_rank[0]}


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "set_epoch", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
