"""Pitfall: parameters that take no part in the loss, and DDP's "Expected to have finished
reduction in the prior iteration" error.

    torchrun --standalone --nproc-per-node 2 pitfalls/unused_parameters.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/unused_parameters.py --right

DDP all-reduces gradients bucket by bucket, as autograd hooks report each parameter's
gradient ready. A parameter that the forward pass did not use never gets a gradient, so its
bucket never fills and the reduction never finishes; DDP notices at the start of the next
forward and stops with the error above. Typical causes: a head kept for another task,
a branch skipped by an `if`, a layer built but not called.

Fixes, each with a price:
- `find_unused_parameters=True`: after every forward DDP walks the autograd graph from the
  outputs and marks the parameters it cannot reach as ready. Works when the unused set
  changes from step to step; costs that traversal on every step.
- `static_graph=True`: DDP records which parameters are used in the first step and relies on
  the set never changing (same code path every step). Pays the traversal once.
- Best, when possible: remove the unused parameter from the model DDP wraps.

In train_ddp.py the first fix is `--find-unused-parameters` (--sync ddp, torch-zero1). The
hand-made --sync modes (parallel/) need no flag: they all-reduce which parameters got a
gradient (parallel/base.used_anywhere), so one that no rank gave a gradient keeps `grad is
None` and is not stepped, as under DDP with the flag and in one process
(tests/test_parallel_base.py).

The right run trains with both flags and with a model that simply has no unused head, checks
that all three end with the same parameters, and prints milliseconds per step of each
(noisy on a busy CPU: compare them within one run, not across machines).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pitfalls import common

STEPS = 20


class TwoHeads(nn.Module):
    """A trunk and two heads; training here uses only `head` (`aux_head` is kept for another
    task, as multi-task and fine-tuning code often does)."""

    def __init__(self, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.aux_head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _train(model: nn.Module, rank: int, **ddp_options) -> tuple[nn.Module, float]:
    """STEPS SGD steps of DDP(model); returns the model and the mean seconds per step after
    the first (which builds the buckets, and under static_graph does the one-off work)."""
    ddp = DDP(model, **ddp_options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    start = 0.0
    for step in range(STEPS):
        if step == 1:
            start = time.perf_counter()
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 1, generator=g)
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
    return model, (time.perf_counter() - start) / (STEPS - 1)


def _fresh() -> TwoHeads:
    torch.manual_seed(0)
    return TwoHeads()


def run(right: bool) -> dict:
    """Needs a process group (the default one)."""
    rank = dist.get_rank()
    if not right:
        try:
            _train(_fresh(), rank)
        except RuntimeError as e:
            first = str(e).strip().split(". ")[0]
            return {"outcome": "error", "message": f"rank {rank}: {first}."}
        return {"outcome": "finished"}
    results = {}
    for name, options in [
        ("find_unused", {"find_unused_parameters": True}),
        ("static_graph", {"static_graph": True}),
    ]:
        results[name] = _train(_fresh(), rank, **options)
    # The reference: the same parameters, minus the head that is never used.
    full = _fresh()
    used = nn.Sequential(full.trunk, full.head)  # shares full's parameters
    _, baseline_s = _train(used, rank)
    reference = dict(full.named_parameters())
    values: dict = {"outcome": "finished"}
    for name, (model, _) in results.items():
        values[f"{name}_max_diff"] = max(
            (p - reference[key]).abs().max().item()
            for key, p in model.named_parameters()
            if not key.startswith("aux_head")
        )
        values[f"{name}_aux_head_grad"] = model.aux_head.weight.grad is not None
    values["ms_per_step_no_unused"] = baseline_s * 1e3
    for name, (_, seconds) in results.items():
        values[f"ms_per_step_{name}"] = seconds * 1e3
    return values


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "unused_parameters", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
