"""train_dp.py's --gpus: which GPUs DataParallel spreads each batch over (train_ddp.py's
counterpart, one GPU per rank from LOCAL_RANK, is core.dist.resolve)."""

from __future__ import annotations

import argparse

import torch

from core.errors import UsageError


def gpu_list(value: str) -> list[int] | None:
    """--gpus: None for every visible GPU, [] for none, else the indices in order."""
    if value == "all":
        return None
    if value == "none":
        return []
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected all, none or indices such as 0,1, got {value!r}"
        ) from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"indices must be distinct and >= 0, got {value!r}")
    return ids


def pick_devices(gpus: list[int] | None) -> list[torch.device]:
    """The devices DataParallel spreads each batch over; [cpu] when there is no GPU."""
    count = torch.cuda.device_count()
    if gpus is None:
        gpus = list(range(count))
    missing = [i for i in gpus if i >= count]
    if missing:
        raise UsageError(
            f"--gpus asks for cuda:{missing[0]} but {count} CUDA device(s) are visible"
        )
    return [torch.device("cuda", i) for i in gpus] or [torch.device("cpu")]
