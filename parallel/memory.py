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
