"""What a rank holds, read from the tensors' storages rather than computed from a formula.

`rank_memory(sync, optimizer)` counts the bytes of the distinct storages behind the model's
parameters and the optimizer's (the shards of the sharded modes), behind their gradients,
and behind the optimizer's per-element state (momentum, Adam's moments; the scalar step
counters are left out). Views share a storage and are counted once, so a model whose
parameters are views into one flat buffer counts that buffer, padding included; a storage
freed by resizing it to 0 bytes (parallel/zero3.py between uses) counts 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's) local shard; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (None and repeats ignored)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = _local(t).untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The optimizer's per-element state tensors. ZeroRedundancyOptimizer keeps its state in
    the optimizer it wraps (`.optim`)."""
    inner = getattr(optimizer, "optim", optimizer)
    return [
        v
        for state in inner.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]


def rank_memory(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state."""
    inner = getattr(optimizer, "optim", optimizer)
    params = [*model.parameters(), *(p for g in inner.param_groups for p in g["params"])]
    return {
        "params": storage_bytes(params),
        "grads": storage_bytes(p.grad for p in params),
        "optimizer": storage_bytes(optimizer_tensors(optimizer)),
    }


# ---- the formulas (docs/ddp-to-fsdp.md), per rank, in bytes ----------------------------------

KINDS = ("params", "grads", "optimizer")
SIMULATED_MODES = ("ddp", "allreduce", "zero1", "zero2", "zero3", "fsdp2")


def _units(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """The trainable parameters of each module that owns some directly: the units that
    parallel/zero3.py gathers one at a time and FSDP2 shards one `fully_shard` at a time."""
    units = [[p for p in m.parameters(recurse=False) if p.requires_grad] for m in model.modules()]
    return [u for u in units if u]


def expected_bytes(mode: str, model: torch.nn.Module, world: int, element: int) -> dict[str, int]:
    """Rank 0's bytes of parameters, gradients and AdamW state (two tensors per element), and
    the bytes it sends per step (ring model: (W-1)/W of each all-gather and reduce-scatter
    payload, 2(W-1)/W of each all-reduce), for `--sync mode` with `world` ranks.

    Flat shards (zero1/2, one buffer for the model; zero3, one per unit) are padded to W x S
    with S = ceil(n / W); rank 0's slice is never short. FSDP2 shards each tensor along its
    first dimension, padded to a multiple of W rows. The hand-made modes broadcast rank 0's
    buffers (BatchNorm statistics) before each training forward, as DDP does (DDP's own
    broadcast runs in C++, where the tracer does not see it: not counted for ddp)."""
    units = _units(model)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    broadcast = 0 if mode in ("ddp", "fsdp2") else buffers  # a broadcast sends its payload
    p = sum(t.numel() for u in units for t in u)
    s = -(-p // world)
    all_reduce = 2 * (world - 1) * p * element / world
    if mode in ("ddp", "allreduce"):
        return dict(params=p * element, grads=p * element, optimizer=2 * p * element,
                    sent=all_reduce + broadcast)  # fmt: skip
    if mode == "zero1":  # all-reduce the gradients, step a slice, all-gather the parameters
        sent = all_reduce + (world - 1) * s * element + broadcast
        return dict(params=world * s * element, grads=world * s * element,
                    optimizer=2 * s * element, sent=sent)  # fmt: skip
    if mode == "zero2":  # reduce-scatter the gradients instead: only the slice is kept
        return dict(params=world * s * element, grads=s * element, optimizer=2 * s * element,
                    sent=2 * (world - 1) * s * element + broadcast)  # fmt: skip
    if mode == "zero3":  # per unit: all-gather in forward and backward, reduce-scatter
        slices = sum(-(-sum(t.numel() for t in u) // world) for u in units)
    elif mode == "fsdp2":  # the same three collectives, per tensor row-padded shards
        slices = sum(-(-t.shape[0] // world) * (t.numel() // max(t.shape[0], 1))
                     for u in units for t in u)  # fmt: skip
    else:
        raise ValueError(f"no formula for --sync {mode}")
    return dict(params=slices * element, grads=slices * element, optimizer=2 * slices * element,
                sent=3 * (world - 1) * slices * element + broadcast)  # fmt: skip
