"""train_dp.py's --gpus: which GPUs DataParallel spreads each batch over (train_ddp.py's
counterpart, one GPU per rank from LOCAL_RANK, is core.dist.resolve)."""

from __future__ import annotations

import torch

from core.errors import UsageError
from training.cli import gpu_list as gpu_list  # --gpus, defined without torch; train_dp.py


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
