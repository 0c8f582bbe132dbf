"""Pitfall: gradient accumulation with `no_sync()` around backward only.

    torchrun --standalone --nproc-per-node 2 pitfalls/no_sync.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/no_sync.py --right

With gradient accumulation, only the last micro-step of an optimizer step needs to
all-reduce; `with ddp.no_sync():` skips the others. But DDP decides during *forward* whether
the coming backward synchronises: forward prepares the reducer unless it runs inside
no_sync. So `loss = ddp(x)` outside and only `loss.backward()` inside does nothing: every
micro-step still all-reduces, the communication you meant to save is all still there. (The
gradients here come out right anyway, because each sync averages the sum accumulated so
far; the cost is what is wrong. The reverse mistake, the last micro-step's forward inside
no_sync, silently skips the one sync that was needed and lets the ranks drift apart.)

The script counts all-reduces with a DDP communication hook (torch's own allreduce_hook,
wrapped to count), checks after the first micro-step whether the gradients are already
identical on every rank (they were synchronised) or still local, and checks the final
gradient against one process summing the micro-step gradients of the global batch.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from pitfalls import common

MICRO_STEPS = 4


def micro_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(10 + rank)
    return [
        (torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(MICRO_STEPS)
    ]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 1)


def _same_on_every_rank(t: torch.Tensor) -> bool:
    everyone = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, t)
    return all(torch.equal(other, t) for other in everyone)


def run(right: bool) -> dict:
    """One optimizer step's worth of accumulation (MICRO_STEPS micro-batches). Needs a
    process group."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    ddp = DDP(model())
    allreduces = 0

    def counting_allreduce(group, bucket):
        nonlocal allreduces
        allreduces += 1
        return allreduce_hook(group, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    synced_early = None
    for i, (x, y) in enumerate(micro_batches(rank)):
        last = i == MICRO_STEPS - 1
        if right:
            with nullcontext() if last else ddp.no_sync():  # forward and backward inside
                F.mse_loss(ddp(x), y).backward()
        else:
            loss = F.mse_loss(ddp(x), y)  # forward outside: this backward will sync
            with nullcontext() if last else ddp.no_sync():
                loss.backward()
        if i == 0:
            synced_early = _same_on_every_rank(ddp.module.weight.grad)
    # One process: the sum over micro-steps of the global-batch mean-loss gradient.
    reference = model()
    for r in range(world_size):
        for x, y in micro_batches(r):
            (F.mse_loss(reference(x), y) / world_size).backward()
    error = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(ddp.module.parameters(), reference.parameters(), strict=True)
    )
    return {
        "micro_steps": MICRO_STEPS,
        "allreduces": allreduces,
        "synced_after_first_micro_step": synced_early,
        "grad_error": error,
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "no_sync", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
