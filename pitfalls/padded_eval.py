"""Pitfall: evaluating with DistributedSampler, which pads the eval set with duplicates.

    torchrun --standalone --nproc-per-node 2 pitfalls/padded_eval.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/padded_eval.py --right

DistributedSampler gives every rank the same number of samples: when the dataset size is not
a multiple of the world size it repeats samples from the start to fill the last round (with
drop_last=True it drops samples instead). For training that is harmless; for evaluation it
means some samples are counted twice (or never), so the metric summed across ranks is not the
metric of the eval set. Here: 9 samples on 2 ranks become 10, and since the repeated sample
is one the model gets right, the accuracy rises from 5/9 to 6/10.

The fix: shard without padding (data.sampling.ShardSampler: rank r takes r, r + W, ...,
shards may differ by one), sum correct answers and counts across ranks, divide once
(training.metrics.evaluate). The right run matches one process evaluating the whole set.
Ranks with one batch more or less are fine here because evaluation runs the plain model,
whose forward has no collective.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from data.sampling import eval_loader
from pitfalls import common
from training.metrics import evaluate

SAMPLES = 9


def eval_set() -> TensorDataset:
    """Sample i is the one-hot vector of class i % 2 with label 0: a model that predicts the
    argmax of its input is right on the even indices, 5 of 9."""
    predicted = torch.arange(SAMPLES) % 2
    return TensorDataset(nn.functional.one_hot(predicted, 2).float(), torch.zeros(SAMPLES).long())


def argmax_model() -> nn.Module:
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.eye(2))
    return net


def run(right: bool) -> dict:
    """Needs a process group."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dataset, device = eval_set(), torch.device("cpu")
    if right:
        loader = eval_loader(dataset, batch_size=4, rank=rank, world_size=world_size)
    else:
        sampler = DistributedSampler(dataset, shuffle=False)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    metrics = evaluate(argmax_model(), loader, device)  # sums across ranks
    images, labels = dataset.tensors  # one process, the whole set, no sampler
    with torch.no_grad():
        true_accuracy = (argmax_model()(images).argmax(1) == labels).double().mean().item()
    return {
        "samples": SAMPLES,
        "counted": metrics["count"],
        "accuracy": metrics["accuracy"],
        "true_accuracy": true_accuracy,
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "padded_eval", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
