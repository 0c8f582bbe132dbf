"""Pitfall: averaging per-rank mean losses when the ranks hold different numbers of samples.

    torchrun --standalone --nproc-per-node 2 pitfalls/loss_normalization.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/loss_normalization.py --right

With padding (variable-length sequences, `ignore_index=-100` targets, masked tokens) the
ranks, and the micro-batches of a gradient accumulation, hold different numbers of samples
that count. `F.cross_entropy(logits, targets, ignore_index=-100)` is the mean over *this*
micro-batch's valid targets; dividing by the accumulation steps and letting DDP average
across ranks then gives the mean of per-micro-batch, per-rank means: a sample in a batch
with few valid targets weighs more than one in a full batch. Nothing fails; the loss and
its gradient are just not those of the global batch (transformers#34191, torchtune#1917:
off by up to world size x accumulation steps).

The fix: per micro-batch, the *sum* of the valid losses; the number of valid targets of the
whole optimizer step (every micro-batch, every rank) from one all-reduce before backward;
each micro-batch's loss is its sum divided by that count, times the world size, because
DDP averages the gradients over the ranks (divides by W) while the count already covers
all of them. The loss to log is the all-reduced sum divided by the same count.

The script gives rank r micro-batches with 6 - 4r - m of their 6 targets valid (2 ranks:
6 and 5, then 2 and 1), takes one DDP backward per micro-batch, and compares the logged loss
and the gradient against one process computing the mean over every valid target at once.
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
ROWS, FEATURES, CLASSES = 6, 8, 5
IGNORE = -100  # the targets of padding: F.cross_entropy leaves them out


def micro_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of this rank's micro-batches, the padded targets set to IGNORE."""
    out = []
    for m in range(MICRO_STEPS):
        g = torch.Generator().manual_seed(10 * rank + m)
        x = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64)
        y = torch.randint(CLASSES, (ROWS,), generator=g)
        valid = max(1, ROWS - 4 * rank - m)
        y[valid:] = IGNORE
        out.append((x, y))
    return out


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES).double()


def oracle(world_size: int) -> tuple[float, list[torch.Tensor]]:
    """One process: the mean loss over every valid target of every rank and micro-batch."""
    net = model()
    batches = [b for r in range(world_size) for b in micro_batches(r)]
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    loss = F.cross_entropy(net(x), y, ignore_index=IGNORE)
    loss.backward()
    return loss.item(), [p.grad for p in net.parameters()]


def step(right: bool) -> tuple[float, list[torch.Tensor]]:
    """This rank's share of one optimizer step under DDP: the loss it logs (the same on
    every rank) and the synchronised gradient."""
    world_size = dist.get_world_size()
    ddp = DDP(model())
    batches = micro_batches(dist.get_rank())
    # The step's valid targets over every micro-batch and rank: one all-reduce, up front.
    count = torch.tensor(sum(int((y != IGNORE).sum()) for _, y in batches), dtype=torch.float64)
    dist.all_reduce(count)
    logged = torch.zeros((), dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        with nullcontext() if i == len(batches) - 1 else ddp.no_sync():
            if right:
                total = F.cross_entropy(ddp(x), y, ignore_index=IGNORE, reduction="sum")
                # x W: DDP divides the summed gradients by the world size.
                (total * world_size / count).backward()
                logged += total.detach() / count
            else:
                mean = F.cross_entropy(ddp(x), y, ignore_index=IGNORE)  # this batch's mean
                (mean / MICRO_STEPS).backward()
                logged += mean.detach() / (MICRO_STEPS * world_size)
    dist.all_reduce(logged)  # right: the sum over ranks; wrong: the mean of the means
    return logged.item(), [p.grad for p in ddp.module.parameters()]


def run(right: bool) -> dict:
    """Needs a process group."""
    world_size = dist.get_world_size()
    true_loss, true_grads = oracle(world_size)
    loss, grads = step(right)
    grad_error = max((g - t).abs().max().item() for g, t in zip(grads, true_grads, strict=True))
    every = [[int((y != IGNORE).sum()) for _, y in micro_batches(r)] for r in range(world_size)]
    return {
        "valid": [n for counts in every for n in counts],
        "loss": loss,
        "true_loss": true_loss,
        "loss_error": abs(loss - true_loss),
        "grad_error": grad_error,
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "loss_normalization", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
