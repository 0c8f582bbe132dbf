"""What a rank holds, read from the tensors' storages rather than computed from a formula.

`rank_memory(sync, optimizer)` counts the bytes of the distinct storages behind the model's
parameters and the optimizer's (the shards of the sharded modes), behind their gradients,
and behind the optimizer's per-element state (momentum, Adam's moments; the scalar step
counters are left out). Views share a storage and are counted once, so a model whose
parameters are views into one flat buffer counts that buffer, padding included; a storage
freed by resizing it to 0 bytes (parallel/zero3.py between uses) counts 0.

`predicted_bytes` is the formula the measurement is tested against (tests/test_parallel_zero.py,
tests/test_parallel_mixed_precision.py, benchmarks/bench_zero.py), mixed precision included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from comm.ring import bus_factor
from parallel.zero1 import shard_range


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
SIMULATED_MODES = ("ddp", "allreduce", "zero1", "zero2", "zero3", "fsdp2", "hsdp", "torch-hsdp")


def _units(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """The trainable parameters of each module that owns some directly: the units that
    parallel/zero3.py gathers one at a time and FSDP2 shards one `fully_shard` at a time."""
    units = [[p for p in m.parameters(recurse=False) if p.requires_grad] for m in model.modules()]
    return [u for u in units if u]


def expected_bytes(
    mode: str, model: torch.nn.Module, world: int, element: int, per_node: int | None = None
) -> dict[str, int]:
    """Rank 0's bytes of parameters, gradients and AdamW state (two tensors per element), and
    the bytes it sends per step, for `--sync mode` with `world` ranks and `model` itself
    (hsdp, torch-hsdp: on nodes of `per_node` ranks):
    `predicted_bytes` for ddp and the hand-made modes (allreduce sends what ddp sends),
    FSDP2's own rule (each tensor sharded along its first dimension, padded to a multiple of
    G rows, G the ranks it is sharded over; per unit two all-gathers and a reduce-scatter over
    them, and with HSDP an all-reduce of the unit's shard across the nodes), and what the
    hand-made modes send besides: rank 0's buffers (BatchNorm statistics) broadcast before
    each training forward, as DDP does in C++ (where the tracer does not see it), and the
    used map."""
    units = _units(model)
    sizes = [sum(t.numel() for t in u) for u in units]
    tensors = sum(len(u) for u in units)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if mode in ("fsdp2", "torch-hsdp"):
        shards = world if mode == "fsdp2" else per_node
        slices = sum(-(-t.shape[0] // shards) * (t.numel() // max(t.shape[0], 1))
                     for u in units for t in u)  # fmt: skip
        held = slices * element
        sent = 3 * (shards - 1) * held + bus_factor("all_reduce", world // shards) * held
        return dict(params=held, grads=held, optimizer=2 * held, sent=sent)
    if mode == "ddp":
        return predicted_bytes("ddp", sizes, world, 0, master=element)
    out = predicted_bytes(
        "ddp" if mode == "allreduce" else mode, sizes, world, 0, master=element, tensors=tensors,
        per_node=per_node,
    )  # fmt: skip
    used_map = 2 * (world - 1) * 4 * tensors / world if mode == "allreduce" else 0
    return {**out, "sent": out["sent"] + buffers + used_map}


def predicted_bytes(
    mode: str,
    units: list[int],
    world_size: int,
    rank: int,
    *,
    master: int,
    param: int | None = None,
    reduce: int | None = None,
    state: int = 2,
    tensors: int = 0,
    per_node: int | None = None,
) -> dict[str, float]:
    """What `rank_memory` reads on `rank` right after optimizer.step() in `--sync mode`
    (ddp, zero1, zero2, zero3, hsdp), and the bytes the rank sends in one step (comm/tracer.py's
    ring model), for a model whose zero3 units have `units` elements. Element sizes in bytes:
    `master` the parameters' own (the optimizer's), `param` the compute copies'
    (--param-dtype; None: master), `reduce` the gradients' on the wire (--reduce-dtype; None:
    param); `state` tensors of optimizer state per element (AdamW 2, SGD with momentum 1).

    With S = ceil(P/W) and o the elements this rank owns (S, less on the last ranks):
    zero1/zero2 keep W x S compute elements (the padded flat buffer) and, in mixed precision,
    their o master elements apart; the gradient the optimizer gets is a view of the kept
    buffer (zero1: W x S, zero2: S) when it is in the master's dtype, else a copy of the o
    elements. zero3 keeps its units' padded master slices and frees the gathered units.
    hsdp (nodes of G = `per_node` ranks, N = W / G of them) holds what zero3 holds on a world
    of G, as rank r % G of it, and sends what that zero3 sends plus, per unit, an all-reduce
    of its padded slice across the N nodes (parallel/hsdp.py).
    `tensors`: the model's parameter tensors, of which the hand-made modes all-reduce an
    int32 each per step (which got a gradient: parallel/base.py's used_anywhere)."""
    p, w = sum(units), world_size
    used_map = bus_factor("all_reduce", w) * 4 * tensors
    param = param or master
    reduce = reduce or param
    mixed = param != master
    if mode == "ddp":
        everything = p * master
        sent = bus_factor("all_reduce", w) * p * master
        return dict(params=everything, grads=everything, optimizer=state * everything, sent=sent)
    size, _, owned = shard_range(p, w, rank)
    optimizer = state * owned * master
    params = w * size * param + (owned * master if mixed else 0)
    if mode == "zero1":
        copy = mixed or reduce != master
        grads = w * size * param + (owned * master if copy else 0)
        sent = bus_factor("all_reduce", w) * p * reduce + (w - 1) * size * param + used_map
        return dict(params=params, grads=grads, optimizer=optimizer, sent=sent)
    if mode == "zero2":
        grads = (size if reduce == master else owned) * master
        return dict(
            params=params,
            grads=grads,
            optimizer=optimizer,
            sent=(w - 1) * size * (reduce + param) + used_map,
        )
    if mode not in ("zero3", "hsdp"):
        raise ValueError(f"no formula for --sync {mode}")
    g, local = (w, rank) if mode == "zero3" else (per_node, rank % per_node)
    slices = [shard_range(u, g, local) for u in units]
    across = bus_factor("all_reduce", w // g) * reduce  # hsdp's all-reduce across nodes
    return dict(
        params=sum(s for s, _, _ in slices) * master,
        grads=sum(s if reduce == master else o for s, _, o in slices) * master,
        optimizer=state * sum(o for _, _, o in slices) * master,
        sent=sum((g - 1) * s * (2 * param + reduce) + across * s for s, _, _ in slices) + used_map,
    )
