"""DataParallel from scratch: what `nn.DataParallel` does on every forward, in one page.

    model = ScratchDataParallel(net, ["cuda:0", "cuda:1"])  # or ["cpu", "cpu"] to study it
    loss = F.cross_entropy(model(images), labels)            # one process, one call
    loss.backward()                                          # gradients land in net itself

Each forward does four things, the same four as torch.nn.parallel's scatter, replicate,
parallel_apply and gather:

1. scatter:   split the batch along dim 0, one chunk per device, and copy each chunk there.
2. replicate: copy the module to every device. A copy's parameters are not new leaves but
              the *outputs* of a differentiable copy of the one set of parameters, so
              backward runs back through the copy and every replica's gradient is summed
              into the original `.grad`. The replica on the first device shares its tensors
              with the module itself (as in nn.DataParallel), so in-place buffer updates
              there, such as BatchNorm running statistics, are kept; the others are lost.
3. parallel apply: run each replica on its chunk in its own Python thread. One process: the
              threads take turns holding the GIL, and overlap only while a torch op runs
              (it releases the GIL) or while CUDA kernels run asynchronously.
4. gather:    concatenate the outputs on the output device, where the loss is computed.

All four happen on every forward, and their backward (gradients copied back and summed on
the first device) on every backward: docs/dp-vs-ddp.md explains why that is what makes
DataParallel slower than DistributedDataParallel.

It runs on CPU "devices" too: with ["cpu", "cpu"] there are two real replicas in two
threads, so the whole mechanism, gradients included, can be tested without a GPU
(nn.DataParallel itself, with no GPU, just calls the module).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn as nn


def scatter(batch: torch.Tensor, devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """Chunks of `batch` along dim 0, as equal as possible, the i-th on devices[i]. A batch
    smaller than the number of devices gives fewer chunks (and so fewer replicas)."""
    chunks = batch.chunk(len(devices))
    return [chunk.to(devices[i], non_blocking=True) for i, chunk in enumerate(chunks)]


def replicate(module: nn.Module, devices: Sequence[torch.device]) -> list[nn.Module]:
    """One copy of `module` per device; devices[0] must be where `module` lives."""
    replicas = []
    for i, device in enumerate(devices):
        # deepcopy's memo says what each tensor becomes in this copy: the module tree (and
        # its Python attributes) is copied, the tensors are replaced by ours.
        memo = {
            id(t): t if i == 0 else t.to(device, copy=True)  # differentiable: grads flow back
            for t in [*module.parameters(), *module.buffers()]
        }
        replicas.append(copy.deepcopy(module, memo))
    return replicas


def parallel_apply(
    replicas: Sequence[nn.Module],
    inputs: Sequence[tuple[torch.Tensor, ...]],
    devices: Sequence[torch.device],
) -> list[torch.Tensor]:
    """replicas[i](*inputs[i]) for every i, each in its own thread; a replica's exception is
    raised here. Grad mode and autocast are per thread in torch, so they are handed on."""
    grad_enabled = torch.is_grad_enabled()
    autocast = {
        d.type: (torch.get_autocast_dtype(d.type), torch.is_autocast_enabled(d.type))
        for d in devices
    }
    results: list = [None] * len(replicas)

    def work(i: int) -> None:
        device = devices[i]
        dtype, enabled = autocast[device.type]
        autocast_on = torch.autocast(device.type, dtype=dtype, enabled=enabled)
        on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        try:
            with torch.set_grad_enabled(grad_enabled), autocast_on, on_device:
                results[i] = replicas[i](*inputs[i])
        except BaseException as e:  # re-raised in the caller's thread below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def gather(outputs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The replicas' outputs concatenated on `device` (differentiable: backward scatters the
    gradient of the loss back to each replica's device)."""
    return torch.cat([out.to(device) for out in outputs])


class ScratchDataParallel(nn.Module):
    """nn.DataParallel in four calls. Every positional input is split along dim 0; the
    module must return one tensor whose dim 0 is the batch."""

    def __init__(
        self,
        module: nn.Module,
        devices: Sequence[torch.device | str],
        output_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.devices = [torch.device(d) for d in devices]
        self.output_device = torch.device(output_device) if output_device else self.devices[0]
        misplaced = [n for n, t in module.state_dict().items() if t.device != self.devices[0]]
        if misplaced:
            raise ValueError(f"module must be on {self.devices[0]} first ({misplaced[0]} is not)")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        chunks = list(zip(*(scatter(x, self.devices) for x in inputs), strict=True))
        devices = self.devices[: len(chunks)]
        replicas = replicate(self.module, devices)
        outputs = parallel_apply(replicas, chunks, devices)
        return gather(outputs, self.output_device)
