"""Pitfall: BatchNorm under DDP normalises each rank's batch with that rank's statistics.

    torchrun --standalone --nproc-per-node 2 pitfalls/batchnorm.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/batchnorm.py --right

DDP synchronises gradients, not activations: a plain BatchNorm layer computes its mean and
variance over the local batch only (B samples, not the W x B of the global batch). Outputs,
gradients and running statistics all differ from one process running the same global batch,
and the smaller the per-rank batch, the noisier they are. Worse, DDP then broadcasts rank 0's
running statistics to everyone, so the model you evaluate only ever saw rank 0's batches.

The fix is synchronised BatchNorm: every rank normalises with the statistics of the whole
global batch. On GPUs that is `nn.SyncBatchNorm.convert_sync_batchnorm(model)`. torch's
SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU"), so on CPU this
script uses `CrossRankBatchNorm` below: the same idea in a few lines, all-reducing the
per-channel sum, sum of squares and count (in float64, so that E[x^2] - E[x]^2 does not
cancel away the variance), with an all-reduce that autograd differentiates so the backward
pass is synchronised too. The script compares every rank with one process running plain
BatchNorm on the whole global batch: outputs of the first step, running statistics and
parameters after three SGD steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from core.dist import DistEnv
from pitfalls import common

PER_RANK_BATCH = 4
STEPS = 3


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) that autograd can go through. Every rank's output is the same sum, so
    the gradient reaching one rank's input is the sum of all ranks' output gradients:
    the backward pass is an all-reduce too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm whose batch statistics cover every rank's batch: a CPU stand-in for
    nn.SyncBatchNorm, for inputs of shape (N, C, ...). In eval mode it uses the running
    statistics like any BatchNorm, with no communication."""

    def __init__(self, num_features: int, *args, group: dist.ProcessGroup | None = None, **kw):
        super().__init__(num_features, *args, **kw)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        xd = x.double()
        local = torch.cat(
            [xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / channels])]
        )
        total = _AllReduceSum.apply(local, self.group)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean  # biased, as BatchNorm
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / self.num_batches_tracked.item()
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * count / (count - 1)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = ((xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @classmethod
    def convert(cls, module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
        """Replace every BatchNorm layer in `module` by a CrossRankBatchNorm holding the same
        parameters and buffers (like nn.SyncBatchNorm.convert_sync_batchnorm)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                group=group,
            )
            new.load_state_dict(module.state_dict())
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, group))
        return module


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def global_batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global batches of world_size x PER_RANK_BATCH samples, the same on every rank."""
    g = torch.Generator().manual_seed(7)
    n = world_size * PER_RANK_BATCH
    return [
        (torch.randn(n, 3, 8, 8, generator=g) * 2 + 1, torch.randint(4, (n,), generator=g))
        for _ in range(STEPS)
    ]


def synchronised(net: nn.Module, env: DistEnv) -> nn.Module:
    """The fix: torch's SyncBatchNorm on GPUs, the CPU stand-in above elsewhere."""
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return CrossRankBatchNorm.convert(net)


def run(right: bool, env: DistEnv) -> dict:
    """Needs a process group. Returns the largest difference, over all ranks, between this
    rank's numbers and one process running plain BatchNorm on the global batch."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    net = model()
    if right:
        net = synchronised(net, env)
    net = net.to(env.device)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = DDP(net, device_ids=device_ids)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    reference = model()  # one process, plain BatchNorm, the whole global batch
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    output_diff = 0.0
    for step, (x, y) in enumerate(global_batches(world_size)):
        opt.zero_grad()
        out = ddp(x[mine].to(env.device))
        F.cross_entropy(out, y[mine].to(env.device)).backward()
        opt.step()
        ref_opt.zero_grad()
        ref_out = reference(x)
        F.cross_entropy(ref_out, y).backward()
        ref_opt.step()
        if step == 0:
            output_diff = (out.detach().cpu() - ref_out.detach()[mine]).abs().max().item()
    bn = next(m for m in net.modules() if isinstance(m, _BatchNorm))
    ref_bn = reference[1]
    diffs = torch.tensor(
        [
            output_diff,
            (bn.running_mean.cpu() - ref_bn.running_mean).abs().max().item(),
            (bn.running_var.cpu() - ref_bn.running_var).abs().max().item(),
            max(
                (p.detach().cpu() - q.detach()).abs().max().item()
                for p, q in zip(net.parameters(), reference.parameters(), strict=True)
            ),
        ],
        device=env.device,
    )
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    output, running_mean, running_var, params = diffs.tolist()
    return {
        "norm": type(bn).__name__,
        "output_diff": output,
        "running_mean_diff": running_mean,
        "running_var_diff": running_var,
        "param_diff": params,
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args, backend=None) as env:
        return common.report(env, "batchnorm", args.right, run(args.right, env))


if __name__ == "__main__":
    sys.exit(common.cli(main))
