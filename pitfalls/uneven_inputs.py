"""Pitfall: uneven inputs, one rank has more batches than another and the job hangs.

    torchrun --standalone --nproc-per-node 2 pitfalls/uneven_inputs.py --wrong --timeout 3
    torchrun --standalone --nproc-per-node 2 pitfalls/uneven_inputs.py --right

Every backward of a DDP model all-reduces the gradients, so all ranks must run the same
number of backward passes. Here rank r has 2 + r batches (an unevenly split stream, or a
sampler without padding). In the wrong run, rank 0 finishes its loop and waits at the
end-of-training barrier while rank 1 is inside the all-reduce of its extra step: each waits
for a message the other will never send, until the process-group timeout (ten minutes by
default, --timeout seconds here) ends both with "Timed out waiting ... for recv".

The fix: `torch.distributed.algorithms.Join`. A rank that runs out of data joins early and
then shadows the collectives of the ranks still training (it contributes zero gradients),
so everybody finishes. DDP divides by the initial world size, so the extra batch counts
exactly as much as any sample of a full global batch; the script checks the final
parameters against a one-process replay of the same schedule, and that all ranks agree.
(Join costs one extra small all-reduce per step, to learn whether anybody has joined.)
"""

import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from pitfalls import common

LR = 0.1


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank r's data: 2 + r batches of 4 samples, the same on every call."""
    g = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(2 + rank)
    ]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 1)


def replay(world_size: int) -> nn.Module:
    """One process, the same schedule: at step s, the gradient is the sum of the mean-loss
    gradients of the ranks that still have a batch, divided by the world size."""
    net = model()
    data = [batches(r) for r in range(world_size)]
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(max(len(d) for d in data)):
        opt.zero_grad()
        present = [d[step] for d in data if step < len(d)]
        loss = sum(F.mse_loss(net(x), y) for x, y in present) / world_size
        loss.backward()
        opt.step()
    return net


def run(right: bool, group: dist.ProcessGroup | None = None) -> dict:
    """Train on uneven inputs, with Join (right) or without (wrong). Needs a process group;
    `group` (default: the whole world) is the one whose timeout ends the deadlock."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    ddp = DDP(model(), process_group=group)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    mine = batches(rank)
    start = time.monotonic()
    try:
        with Join([ddp]) if right else nullcontext():
            for x, y in mine:
                opt.zero_grad()
                F.mse_loss(ddp(x), y).backward()
                opt.step()
        dist.barrier(group=group)  # e.g. before rank 0 writes the final checkpoint
    except RuntimeError as e:  # gloo: "Timed out waiting ...ms for recv operation"
        waited = time.monotonic() - start
        first = str(e).strip().splitlines()[0]
        outcome = "timeout" if "timed out" in first.lower() else "error"
        return {
            "outcome": outcome,
            "rank": rank,
            "batches": len(mine),
            "waited_s": round(waited, 1),
            "message": f"rank {rank} ({len(mine)} batches) gave up after {waited:.1f} s: {first}",
        }
    reference = replay(world_size)
    error = max(
        (p - q).abs().max().item()
        for p, q in zip(ddp.parameters(), reference.parameters(), strict=True)
    )
    flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat, group=group)
    spread = max((t - flat).abs().max().item() for t in everyone)
    return {
        "outcome": "finished",
        "batches": [len(batches(r)) for r in range(world_size)],
        "max_error_vs_replay": error,
        "max_spread_across_ranks": spread,
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "uneven_inputs", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
