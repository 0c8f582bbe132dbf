"""The model and the fixed batch a benchmark times: an image model on a random batch of 32x32
RGB images (10 classes), or `--model gpt` on windows of real text.

The gpt is built and fed as train_ddp.py builds and feeds it: `model_from_args` with the size
flags of training/cli.py (--context, --gpt-layers, --gpt-width, --gpt-heads), and
`build_datasets` for the bytes (--dataset stdlib, the interpreter's own standard library, or
--dataset text --data-dir PATH), so a benchmark's gpt is the model `make gpt` trains, at the
sizes given. Each rank takes --batch-size windows of its own (rank r: windows r, r + W, ...,
spread over the training split), the loss is training/metrics.py's `loss_fn`, one prediction
per position.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.errors import UsageError
from data import TEXT_DATASETS
from data.datasets import DataSpec, build_datasets
from data.text import VOCAB
from training.cli import MODELS, TEXT_MODELS, add_gpt_size_flags, check_model_data
from training.metrics import loss_fn
from training.models import model_from_args

BENCH_MODELS = MODELS + TEXT_MODELS


def add_model_flags(p: argparse.ArgumentParser, default: str = "cnn") -> None:
    """--model (an image model or gpt), gpt's sizes and its text."""
    p.add_argument(
        "--model",
        default=default,
        choices=BENCH_MODELS,
        help="network to train (gpt: the small language model, on --dataset's text)",
    )
    g = p.add_argument_group("--model gpt (training/gpt.py; the sizes as train_ddp.py's)")
    add_gpt_size_flags(g)
    g.add_argument(
        "--dataset",
        choices=TEXT_DATASETS,
        default=None,
        help="gpt's text: stdlib (default: this Python's standard library) or text (--data-dir)",
    )
    g.add_argument("--data-dir", default=None, help="--dataset text's file or folder")


IMAGES = argparse.Namespace(in_channels=3, image_size=32, num_classes=10)  # the random batch


def model_named(name: str, args: argparse.Namespace) -> nn.Module:
    """Model `name` as a workload builds it (gpt with the size flags of `args`), for a
    benchmark that needs only its parameters' shapes."""
    sizes = argparse.Namespace(in_channels=1, image_size=args.context, num_classes=VOCAB)
    return model_from_args(
        argparse.Namespace(**{**vars(args), "model": name}), sizes if name == "gpt" else IMAGES
    )


@dataclass
class Workload:
    """A model builder, one rank's fixed batch, and the loss of a model on it."""

    name: str
    data: DataSpec | argparse.Namespace  # what model_from_args sizes the model for
    args: argparse.Namespace
    x: torch.Tensor
    y: torch.Tensor

    def build(self) -> nn.Module:
        """A fresh model (seed it first: every variant must start from the same weights)."""
        return model_from_args(self.args, self.data)

    def loss(self, model: nn.Module | Callable) -> torch.Tensor:
        return loss_fn(model(self.x), self.y)

    @property
    def what(self) -> str:
        """The model and the batch, for a report's title."""
        b = len(self.x)
        if self.name != "gpt":
            return f"--model {self.name}, {b} samples per rank"
        a = self.args
        return (
            f"--model gpt (--gpt-layers {a.gpt_layers} --gpt-width {a.gpt_width} --gpt-heads "
            f"{a.gpt_heads} --context {a.context}, --dataset {a.dataset}), {b} windows per rank"
        )


def workload(
    args: argparse.Namespace, batch_size: int, rank: int, world_size: int, device: torch.device
) -> Workload:
    """--model's workload with `batch_size` samples for `rank` of `world_size`, on `device`."""
    if args.model not in TEXT_MODELS:
        if args.dataset or args.data_dir:
            raise UsageError("--dataset and --data-dir are --model gpt's text")
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own shard of the batch
        x = torch.randn(batch_size, 3, 32, 32, generator=g)
        y = torch.randint(10, (batch_size,), generator=g)
        return Workload(args.model, IMAGES, args, x.to(device), y.to(device))
    args = argparse.Namespace(**{**vars(args), "dataset": args.dataset or "stdlib"})
    check_model_data(argparse.Namespace(**{**vars(args), "sample": 0}))
    data = build_datasets(args.dataset, args.data_dir, seed=0, context=args.context)
    n = len(data.train)
    if n < batch_size * world_size:
        raise UsageError(
            f"the training split has {n} windows of --context {args.context} + 1 bytes, "
            f"fewer than --batch-size {batch_size} x {world_size} ranks"
        )
    # Windows spread over the whole split (not its first files), a different set per rank.
    picks = [(k * world_size + rank) * n // (batch_size * world_size) for k in range(batch_size)]
    x, y = (torch.stack(t) for t in zip(*(data.train[i] for i in picks), strict=True))
    return Workload("gpt", data, args, x.to(device), y.to(device))
