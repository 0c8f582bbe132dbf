"""Pitfall: clipping the gradient per micro-batch, or before the gradients are synchronised.

    torchrun --standalone --nproc-per-node 2 pitfalls/clip_grad.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/clip_grad.py --right

`clip_grad_norm_(params, X)` scales the gradient by min(1, X / ||g||). The g that one process
would clip is the gradient of the whole optimizer step: every micro-batch of a gradient
accumulation, every rank's samples. Two places to call it look harmless and are not:

- per micro-batch, inside the accumulation loop (after each backward): the running sum is
  clipped K times, each time by the norm of a partial sum, and the last micro-batch is
  scaled differently from the first;
- before the sync, in a loop that all-reduces the gradients itself (a hand-made DDP, local
  SGD, a custom comm hook that runs late): each rank clips its own gradient by its own norm,
  and the average of clipped gradients is not the clipped average.

Neither raises anything: the loss still goes down, only not the way the one-process run's
does. The fix is one call in one place: after the last micro-batch's backward, once DDP has
averaged the gradients (after `scaler.unscale_(optimizer)` with fp16), right before
`optimizer.step()`; that is what `train_dp.py` and `train_ddp.py --clip-grad-norm X` do
(parallel/clip.py, also for the sharded modes, where the norm needs one all-reduce).

The script takes one SGD step of a small float64 model on 2 micro-batches per rank, with
X below the gradient's norm, and compares the parameters against one process clipping the
gradient of the whole global batch.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pitfalls import common

MICRO_STEPS = 2
MAX_NORM = 1.0  # below the step gradient's norm (2.58 on 2 ranks): clipping is active
LR = 0.1


def micro_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(4, 6, generator=g, dtype=torch.float64),
         torch.randn(4, 1, generator=g, dtype=torch.float64) * (1 + rank))
        for _ in range(MICRO_STEPS)
    ]  # fmt: skip


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def oracle(world_size: int) -> tuple[float, list[torch.Tensor]]:
    """One process, the whole global batch: the gradient of the mean loss, clipped once."""
    net = model()
    for r in range(world_size):
        for x, y in micro_batches(r):
            (F.mse_loss(net(x), y) / (world_size * MICRO_STEPS)).backward()
    norm = nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM).item()
    return norm, _stepped(net)


def _stepped(net: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [p - LR * p.grad for p in net.parameters()]


def right_step(rank: int) -> tuple[float, list[torch.Tensor]]:
    """DDP, accumulation inside no_sync, one clip after the synchronising backward."""
    ddp = DDP(model())
    for i, (x, y) in enumerate(micro_batches(rank)):
        with nullcontext() if i == MICRO_STEPS - 1 else ddp.no_sync():
            (F.mse_loss(ddp(x), y) / MICRO_STEPS).backward()
    norm = nn.utils.clip_grad_norm_(ddp.parameters(), MAX_NORM).item()  # here, once
    return norm, _stepped(ddp.module)


def per_micro_batch_step(rank: int) -> tuple[list[float], list[torch.Tensor]]:
    """DDP, the clip inside the accumulation loop: after every micro-batch's backward."""
    ddp = DDP(model())
    norms = []
    for i, (x, y) in enumerate(micro_batches(rank)):
        with nullcontext() if i == MICRO_STEPS - 1 else ddp.no_sync():
            (F.mse_loss(ddp(x), y) / MICRO_STEPS).backward()
        norms.append(nn.utils.clip_grad_norm_(ddp.parameters(), MAX_NORM).item())  # wrong
    return norms, _stepped(ddp.module)


def before_sync_step(rank: int, world_size: int) -> tuple[float, list[torch.Tensor]]:
    """A hand-made sync (all-reduce after backward), the clip before it: each rank clips its
    own gradient by its own norm, then the clipped gradients are averaged."""
    net = model()
    for x, y in micro_batches(rank):
        (F.mse_loss(net(x), y) / MICRO_STEPS).backward()
    norm = nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM).item()  # wrong: local norm
    for p in net.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size
    return norm, _stepped(net)


def error(params: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max((p - q).abs().max().item() for p, q in zip(params, reference, strict=True))


def largest_over_ranks(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(right: bool) -> dict:
    """One optimizer step each way; errors are the largest over the ranks. Needs a process
    group."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    oracle_norm, reference = oracle(world_size)
    values = {"max_norm": MAX_NORM, "oracle_norm": oracle_norm}
    if right:
        norm, params = right_step(rank)
        values.update(norm=norm, error=largest_over_ranks(error(params, reference)))
        return values
    norms, params = per_micro_batch_step(rank)
    values.update(
        per_micro_batch_norms=norms,
        per_micro_batch_error=largest_over_ranks(error(params, reference)),
    )
    local_norm, params = before_sync_step(rank, world_size)
    every_rank = [None] * world_size
    dist.all_gather_object(every_rank, local_norm)
    values.update(
        before_sync_norms=every_rank,
        before_sync_error=largest_over_ranks(error(params, reference)),
    )
    return values


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "clip_grad", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
