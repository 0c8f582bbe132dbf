"""--activation-checkpointing (training/models.py, checkpoint_activations): each block keeps
only its input for backward and recomputes the rest there.

Oracles, in float64 on one process:
- the gradients are bit-identical with and without it: the recomputation runs the same
  kernels on the same inputs in the same order (no reduction is reassociated), so it cannot
  differ by even one rounding; BatchNorm's running statistics are updated once, not twice;
- the activation memory, counted by torch's MemTracker (a dispatch mode that sees every
  tensor created and freed, so the count is deterministic), is lower at the end of forward,
  and for a model whose blocks are the same size (a residual stack, as --model gpt's) at the
  peak of backward too, within closed-form bounds.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from training.models import blocks_of, build_model, checkpoint_activations

BATCH, WIDTH, HIDDEN, BLOCKS, CLASSES = 64, 64, 256, 4, 10
F64 = 8


class Stack(nn.Module):
    """A residual stack that lists its blocks as `.blocks`, as --model gpt does."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
            for _ in range(BLOCKS)
        )
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)[:, :WIDTH]
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "stack":
        return Stack().double()
    return build_model(name, 3, 16 if name == "resnet18" else 32, CLASSES).double()


def activations(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """Bytes of activations held at the end of forward, and at the peak of the step."""
    tracker = MemTracker()
    tracker.track_external(net, x, y)

    def act(kind: str) -> int:
        snap = tracker.get_tracker_snapshot(kind)
        return sum(v for dev in snap.values() for k, v in dev.items() if str(k).endswith("ACT"))

    with tracker:
        loss = F.cross_entropy(net(x), y)
        held = act("current")
        loss.backward()
    return held, act("peak")


def data(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    return x, torch.randint(CLASSES, (batch,), generator=g)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["stack", "cnn"])
def test_gradients_identical_and_activations_smaller(name):
    plain = model(name)
    checkpointed = checkpoint_activations(copy.deepcopy(plain))
    x, y = data(BATCH, 32)
    held, peak = activations(plain, x, y)
    held_ac, peak_ac = activations(checkpointed, x, y)
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    if name == "stack":
        # Without: each block keeps its input, the GELU's input and output (B x (D + 2H)).
        # With: each block's input only, and the head's (B x D each), plus the logits.
        rows = BATCH * F64
        assert held >= BLOCKS * rows * (WIDTH + 2 * HIDDEN)
        assert held_ac <= (BLOCKS + 1) * rows * WIDTH + rows * CLASSES + 64
        # At the peak of backward, one block is recomputed at a time: one block's hidden
        # activations instead of all of them.
        assert peak_ac <= peak - (BLOCKS - 1) * rows * 2 * HIDDEN
    else:
        # The cnn: the first block (conv, ReLU, pool on 32x32) dominates both counts; at the
        # end of forward only the blocks' inputs are left. Its peak is in the first block's
        # backward, which recomputation cannot shrink: not asserted lower.
        assert held_ac * 4 < held
        assert peak_ac <= peak


def test_blocks_of_each_model():
    cnn = [[type(m).__name__ for m in run] for run in blocks_of(model("cnn"))]
    assert cnn == [
        ["Conv2d", "ReLU", "MaxPool2d"],
        ["Conv2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten"],
        ["Linear", "ReLU"],
        ["Linear"],
    ]
    assert [len(run) for run in blocks_of(model("mlp"))] == [3, 2, 1]
    stack = Stack()
    assert [run for (run,) in blocks_of(stack)] == list(stack.blocks)


@pytest.mark.slow  # resnet18's backward, twice: 7 s here
@pytest.mark.oracle
def test_resnet18_batchnorm_statistics_updated_once():
    plain = model("resnet18")
    checkpointed = checkpoint_activations(copy.deepcopy(plain))
    x, y = data(4, 16)
    for net in (plain, checkpointed):
        F.cross_entropy(net(x), y).backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(a, b), name  # running mean, variance, batches tracked: once
    with torch.no_grad():  # evaluation: no checkpoint, the same outputs
        plain.eval(), checkpointed.eval()
        assert torch.equal(plain(x), checkpointed(x))
