"""Metrics summed across ranks, and exact evaluation.

One loss for both kinds of model: an image classifier's logits are (batch, classes) with
labels (batch); a language model's are (batch, time, vocab) with labels (batch, time), one
prediction per position. `loss_fn` flattens the positions into the batch, so the loss is the
mean over every prediction and `accuracy` counts tokens. The repository's text is bytes (one
token per byte, data/text.py), so a language model's mean loss in nats / ln 2 is its
bits per byte, which the metrics add when a batch had positions."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from training.models import model_input


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every prediction: (B, C) vs (B), or (B, T, V) vs (B, T)."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions (samples, or tokens) are right."""
    return (logits.detach().argmax(-1) == labels).sum()


class Totals:
    """Running sums of (loss x predictions, correct, predictions, samples, tokens), kept on
    the device so that adding to them never waits for the GPU, and summed across ranks only
    when read. A classifier makes one prediction per sample; a language model one per
    position (token) of each sample (window), and its tokens make bits per byte meaningful."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(
        self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int, samples: int = 0
    ) -> None:
        """`count` predictions in `samples` samples (0: one prediction per sample)."""
        self.sums[0] += loss_sum.detach().double()
        self.sums[1] += correct.double()
        self.sums[2] += count
        self.sums[3] += samples or count
        if samples:
            self.sums[4] += count

    def add_batch(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch's mean `loss` (from loss_fn) and its `logits` against `labels`."""
        n = labels.numel()
        samples = len(labels) if logits.dim() == 3 else 0
        self.add(loss.detach() * n, correct(logits, labels), n, samples)

    def reduce(self) -> dict[str, float]:
        """All ranks' totals (a collective: every rank must call it), then reset: the mean
        loss and accuracy per prediction, the samples counted, and a language model's bits
        per byte."""
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.sums.zero_()
        loss, correct, predictions, samples, tokens = sums.tolist()
        n = max(predictions, 1.0)
        out = {"loss": loss / n, "accuracy": correct / n, "count": int(samples)}
        if tokens:  # summed over all ranks, so every rank returns the same keys
            out["bits_per_byte"] = loss / n / math.log(2)
        return out


def bits_text(metrics: dict[str, float], label: str = "bpb") -> str:
    """The log line's tail for `metrics`: "  bpb 1.234" for a language model's, nothing for a
    classifier's (whose log lines stay as they were)."""
    bits = metrics.get("bits_per_byte")
    return "" if bits is None else f"  {label} {bits:.3f}"


def scalars(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """TensorBoard scalars `prefix`/loss, /accuracy and /bits_per_byte (when there)."""
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k != "count"}


@torch.no_grad()  # no graph, no saved activations: evaluation needs no gradients
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and accuracy (and bits per byte, for a language model) over the whole eval set,
    each sample counted exactly once.

    Pass the *unwrapped* model: its forward runs no collective, so ranks with one batch
    more or less than their peers (the eval shards differ by up to one sample) cannot hang.
    """
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics, dropout is off
    totals = Totals(device)
    for inputs, labels in loader:
        inputs = model_input(inputs, device, dtype)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            logits = model(inputs)
        loss_sum = loss_fn(logits.to(dtype), labels, reduction="sum")
        samples = len(labels) if logits.dim() == 3 else 0
        totals.add(loss_sum, correct(logits, labels), labels.numel(), samples)
    model.train(was_training)
    return totals.reduce()
