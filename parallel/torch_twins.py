"""torch's own sharded data parallelism: the library twins of parallel/zero1.py,
parallel/zero3.py and parallel/hsdp.py.

    train_ddp.py --sync torch-zero1 --optimizer adamw   # DDP + ZeroRedundancyOptimizer
    train_ddp.py --sync fsdp2 --optimizer adamw         # fully_shard (FSDP2)
    train_ddp.py --sync torch-hsdp --topology 2x2       # fully_shard on a 2-D mesh (HSDP)

- `torch-zero1`: `torch.distributed.optim.ZeroRedundancyOptimizer` wraps the optimizer of
  a DDP model. DDP all-reduces the gradients; each rank steps the parameters it owns and
  broadcasts them to the others. Unlike parallel/zero1.py it partitions whole parameter
  tensors (greedily, by size), not a flat buffer, so the shards are as even as the
  tensors allow: with the default CNN one rank owns the 65,536-element linear layer and
  holds far more optimizer state than the other.
- `fsdp2`: `torch.distributed.fsdp.fully_shard` on every module that owns parameters (the
  same units as parallel/zero3.py), then on the root. Each parameter becomes a DTensor sharded
  along its first dimension (padded per parameter, not per unit); forward and backward
  all-gather each unit and free it after use; gradients are reduce-scattered. Mixed
  precision (--param-dtype, --reduce-dtype) is its `MixedPrecisionPolicy(param_dtype,
  reduce_dtype)`: the hand-made zero1/2/3 follow the same rules (parallel/zero1.py).
- `torch-hsdp`: the same `fully_shard` calls on a 2-D device mesh of N x G ranks (--topology
  NxG), dimensions named ("replicate", "shard"): each parameter sharded over the G ranks of
  a node and replicated over the N nodes; FSDP2 then reduce-scatters each gradient inside
  the node and all-reduces the shard across nodes, as parallel/hsdp.py does by hand.

Both match `--sync ddp` in float64 (tests/test_parallel_zero.py) and run on CPU with gloo.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

from parallel.base import Sync, broadcast_state
from parallel.clip import clip_grad_norm_
from parallel.ddp import DDPSync

if TYPE_CHECKING:  # the --param-dtype/--reduce-dtype pair, shared with the hand-made modes
    from parallel.zero1 import Precision


class TorchZero1Sync(DDPSync):
    """DDP's gradients, ZeroRedundancyOptimizer's sharded step."""

    sharded = True

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        return ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=cls, **kwargs)


class FSDP2Sync(Sync):
    """fully_shard on each module that owns parameters, then on the whole model."""

    sharded = True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        # DTensor gradients: torch's total norm is itself a DTensor, made whole once here.
        return clip_grad_norm_(self.model.parameters(), max_norm)

    def __init__(
        self,
        model: nn.Module,
        precision: Precision | None = None,
        layout: tuple[int, int] | None = None,
    ) -> None:
        """`layout`: (nodes, ranks per node) for HSDP (torch-hsdp); None: one dimension, the
        whole world (fsdp2)."""
        broadcast_state(model)  # fully_shard keeps each rank's own values: start from rank 0's
        # A parameter-less copy on the meta device: consolidated() fills it with the full model.
        self._template = copy.deepcopy(model).to("meta")
        # The mesh of the device the model is on, not fully_shard's default: that one is on
        # torch's accelerator, a GPU wherever one exists, and moves the parameters there,
        # while --backend gloo computes (and feeds its batches) on the CPU.
        self._device = next(model.parameters()).device
        if layout is None:
            mesh = init_device_mesh(self._device.type, (dist.get_world_size(),))
        else:  # torchrun's numbering: rank = node x G + local index, as comm/topology.py
            mesh = init_device_mesh(
                self._device.type, layout, mesh_dim_names=("replicate", "shard")
            )
        policy = MixedPrecisionPolicy()  # no cast: the parameters' own dtype
        if precision is not None:
            policy = MixedPrecisionPolicy(precision.param_dtype, precision.reduce_dtype)
        for module in model.modules():
            if module is not model and any(True for _ in module.parameters(recurse=False)):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        super().__init__(model)
        self._plain: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The sharded model; inside consolidated() a plain copy holding the full model."""
        return self._plain if self._plain is not None else self._sharded

    @model.setter
    def model(self, value: nn.Module) -> None:
        self._sharded = value

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        # Micro-steps keep their unsharded gradients and accumulate into them; the last
        # micro-step's backward reduce-scatters the sum.
        self._sharded.set_requires_gradient_sync(False)
        try:
            with super().no_sync():
                yield
        finally:
            self._sharded.set_requires_gradient_sync(True)

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        """Every rank gets a plain (unsharded) copy for the block: evaluation runs a
        different number of batches on each rank, which a sharded forward, gathering each
        unit from every rank, cannot."""
        full = get_model_state_dict(self._sharded, options=StateDictOptions(full_state_dict=True))
        plain = copy.deepcopy(self._template).to_empty(device=self._device)
        plain.load_state_dict(full)
        self._plain = plain
        try:
            yield
        finally:
            self._plain = None
