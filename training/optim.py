"""Optimizer, learning-rate schedule and autocast settings built from the shared flags."""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn

from parallel.base import Sync


def optimizer_spec(args: argparse.Namespace) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class --optimizer names and its keyword arguments from the flags.
    --lr is used as given: not rescaled with the world size or the global batch, so
    train_dp.py with batch 2B and train_ddp.py on 2 ranks x B take the same steps."""
    if getattr(args, "optimizer", "sgd") == "adamw":  # namespaces built by hand: SGD
        # Two state tensors per parameter (first and second moments): the memory that the
        # sharded modes of comm/ divide by the world size.
        kwargs = dict(lr=args.lr, betas=tuple(args.betas), eps=args.eps)
        return torch.optim.AdamW, {**kwargs, "weight_decay": args.weight_decay}
    return torch.optim.SGD, dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def make_optimizer(
    model: nn.Module, args: argparse.Namespace, sync: Sync | None = None
) -> torch.optim.Optimizer:
    """--optimizer (see optimizer_spec) over the model's parameters, or, given train_ddp.py's
    --sync strategy, over what this rank steps: `sync.make_optimizer` (every parameter, but
    only this rank's shard in the sharded modes, and ZeroRedundancyOptimizer for torch-zero1)."""
    cls, kwargs = optimizer_spec(args)
    if sync is not None:
        return sync.make_optimizer(cls, kwargs)
    return cls(model.parameters(), **kwargs)


def make_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over --warmup-steps, then constant or cosine decay to zero at the
    last step. Stepped once per optimizer step, never per micro-batch."""
    warmup, cosine = args.warmup_steps, args.lr_schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
