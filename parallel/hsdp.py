"""HSDP by hand (hybrid sharded data parallel): ZeRO-3 inside each node, DDP across nodes.

    torchrun --standalone --nproc-per-node 4 train_ddp.py --sync hsdp --topology 2x2

zero3 (parallel/zero3.py) shards every unit over all W ranks, so each of its all-gathers and
reduce-scatters spans the whole job, and on N nodes most of a ring's hops cross the slow
inter-node network. HSDP shards each unit over the G ranks of one node only (the fast links)
and keeps N replicas of those shards, one per node; the ranks with the same local index on
every node hold the same slice and form a replica group (comm/topology.py's inter-node
group, `cross_ranks`):

    forward, backward  all-gather each unit inside the node (G ranks), as zero3 over G
    gradients          reduce-scatter inside the node: this rank's slice summed over its node;
                       all-reduce that slice across the N nodes (its replica group): the sum
                       over all W ranks; divided by W
    step               each rank steps its slice; the replicas step the same slice alike

So a rank holds what zero3 holds at world size G (sum over units of ceil(P_u / G) elements
of parameters, gradients and k x that of optimizer state), about N times zero3's at W = N x G,
and sends per step, per unit of S = ceil(P_u / G) elements,

    inside the node   2 all-gathers + 1 reduce-scatter of G x S:   3 (G-1) x S elements
    across nodes      1 all-reduce of S:                           2 (N-1)/N x S elements

against 3 (W-1)/W x P for zero3 over all W. Only the last line crosses the network: about
1/G of what DDP's flat ring sends there (2(N-1)/N x P/G against 2(W-1)/W x P), 2/(3G) of
zero3's (FSDP2's HybridShard; torchtitan's dp_replicate x dp_shard). Everything else is
zero3's: the units and their padding, a parameter no rank gave a gradient keeping `grad is
None` (parallel/base.used_anywhere, over all W ranks), every rank running the same modules.
Mixed precision (--param-dtype) is not offered here: refused in one line.

`--sync hsdp` needs `--topology NODESxPER_NODE` (which ranks share a node): without one it
is refused rather than guessed. `--topology 1xW` is zero3 (one node), `Wx1` is DDP with a
reduce per unit. `--inter-node-gbps` delays the across-nodes all-reduce as comm/topology.py
does. The library twin is `--sync torch-hsdp` (parallel/torch_twins.py): `fully_shard` on a
2-D device mesh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from comm.compat import reduce_scatter_single
from parallel.zero1 import FULL, Precision
from parallel.zero3 import Unit, Zero3Sync

if TYPE_CHECKING:  # built by parallel/factory.py (comm/topology.build_topology)
    from comm.topology import Topology


class HSDPUnit(Unit):
    """A zero3 unit sharded over one node, its gradient slice averaged across the nodes."""

    def __init__(self, module: nn.Module, topology: Topology, precision: Precision) -> None:
        group = topology.intra
        super().__init__(
            module, dist.get_world_size(group), dist.get_rank(group), precision, group=group
        )
        self.topology = topology

    def average(self, grad_shard: torch.Tensor, flat_grad: torch.Tensor) -> None:
        topo = self.topology
        reduce_scatter_single(grad_shard, flat_grad, group=topo.intra)  # the node's sum
        dist.all_reduce(grad_shard, group=topo.inter)  # every node's: the slice's replicas
        topo.inter_all_reduce_delay(grad_shard.numel() * grad_shard.element_size())
        grad_shard.div_(topo.nodes * topo.per_node)


class HSDPSync(Zero3Sync):
    """zero3 over the ranks of each node, the shards' gradients all-reduced across nodes."""

    def __init__(self, model: nn.Module, topology: Topology) -> None:
        self.topology = topology
        self.mesh_shape = (topology.nodes, topology.per_node)  # training/sharded.py's DTensors
        super().__init__(model, FULL)

    def make_unit(self, module: nn.Module, precision: Precision) -> Unit:
        return HSDPUnit(module, self.topology, precision)
