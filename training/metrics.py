"""Metrics summed across ranks, and exact evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


class Totals:
    """Running sums of (loss x samples, correct, samples), kept on the device so that adding
    to them never waits for the GPU, and summed across ranks only when read."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.sums[0] += loss_sum.detach().double()
        self.sums[1] += correct.double()
        self.sums[2] += count

    def reduce(self) -> dict[str, float]:
        """All ranks' totals (a collective: every rank must call it), then reset."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        loss, correct, count = sums.tolist()
        n = max(count, 1.0)
        return {"loss": loss / n, "accuracy": correct / n, "count": int(count)}


@torch.no_grad()  # no graph, no saved activations: evaluation needs no gradients
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and accuracy over the whole eval set, each sample counted exactly once.

    Pass the *unwrapped* model: its forward runs no collective, so ranks with one batch
    more or less than their peers (the eval shards differ by up to one sample) cannot hang.
    """
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics, dropout is off
    totals = Totals(device)
    for images, labels in loader:
        images = images.to(device, dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            logits = model(images)
        totals.add(
            F.cross_entropy(logits.to(dtype), labels, reduction="sum"),
            (logits.argmax(1) == labels).sum(),
            labels.numel(),
        )
    model.train(was_training)
    return totals.reduce()
