"""Topology on one machine: pretend the W ranks sit on N nodes of G ranks each.

    torchrun --standalone --nproc-per-node 4 train_ddp.py --sync allreduce --topology 2x2
    python -m benchmarks.bench_topology            # when does hierarchy beat the flat ring?

torchrun numbers ranks node by node, so rank r is local rank r % G of node r // G. Two
families of process groups follow (for 2x2: nodes {0,1} {2,3}; across {0,2} {1,3}):

    intra-node  the G ranks of one node               (NVLink / shared memory: fast)
    inter-node  the N ranks with the same local index (the network: slow, one link per rank)

`hierarchical_all_reduce` sums a tensor over all W ranks in three steps (Horovod's
HOROVOD_HIERARCHICAL_ALLREDUCE, NCCL's tree/collnet split, FSDP2's HSDP replicate dimension):

    1. intra-node reduce-scatter: each rank of a node ends with 1/G of the node's sum
       (the tensor padded with zeros to a multiple of G, so the shards are equal);
    2. inter-node all-reduce of that one shard: now each shard holds the sum over all nodes;
    3. intra-node all-gather: every rank gets every summed shard.

Only step 2 crosses the network, and it carries S/G bytes instead of S: on a ring each rank
sends 2(N-1)/N x S/G bytes over its inter-node link, against 2(W-1)/W x S when one flat ring
runs over all W ranks (its slowest links, the ones between nodes, then carry the whole
2(W-1)/W x S). docs/topology.md states the formulas and measures when this pays.

Slow-link emulation (`inter_node_gbps`): on one machine every link is loopback, so a
collective on a group that spans nodes is followed by a sleep of the bytes each rank sends in
it (ring model, comm.ring.bus_factor x payload) divided by the link speed. `flat_all_reduce`
applies the same rule to the plain all-reduce over all W ranks, for the comparison.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.communicate import CommOp
from comm.compat import all_gather_single, reduce_scatter_single
from comm.ring import bus_factor
from core.errors import UsageError

INTRA, INTER = "intra-node", "inter-node"  # the groups' group_desc: the tracer's labels


def parse_topology(text: str) -> tuple[int, int]:
    """'2x2' -> (nodes, ranks per node)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise UsageError(f"--topology {text!r}: expected NODESxPER_NODE with positive numbers")
    return int(match[1]), int(match[2])


def node_ranks(nodes: int, per_node: int) -> list[list[int]]:
    """The ranks of each node: node n holds n*G .. n*G + G-1 (torchrun's numbering)."""
    return [[n * per_node + i for i in range(per_node)] for n in range(nodes)]


def cross_ranks(nodes: int, per_node: int) -> list[list[int]]:
    """The ranks with local index i on every node, for each i."""
    return [[n * per_node + i for n in range(nodes)] for i in range(per_node)]


@dataclass
class Topology:
    """This rank's place in an N x G layout and its two groups."""

    nodes: int
    per_node: int
    intra: dist.ProcessGroup  # this rank's node
    inter: dist.ProcessGroup  # this rank's peers with the same local index
    inter_node_gbps: float | None = None  # emulated link speed (Gbit/s); None: no delay

    def link_delay(self, sent_bytes: float) -> None:
        """Sleep as long as `sent_bytes` take on the emulated inter-node link."""
        if self.inter_node_gbps and sent_bytes:
            time.sleep(sent_bytes * 8 / (self.inter_node_gbps * 1e9))

    def inter_all_reduce_delay(self, nbytes: int) -> None:
        """Sleep as long as a ring all-reduce of `nbytes` over the inter-node group takes on
        the emulated link: each rank sends 2(N-1)/N x nbytes over it."""
        self.link_delay(bus_factor("all_reduce", self.nodes) * nbytes)


def check_layout(text: str, inter_node_gbps: float | None, world_size: int) -> tuple[int, int]:
    """(nodes, ranks per node) of `text`, which must fit the world; the link speed, if given,
    must be positive."""
    nodes, per_node = parse_topology(text)
    if nodes * per_node != world_size:
        raise UsageError(
            f"--topology {text}: {nodes} x {per_node} = {nodes * per_node} ranks, "
            f"but the world has {world_size}"
        )
    if inter_node_gbps is not None and not inter_node_gbps > 0:
        raise UsageError(f"--inter-node-gbps must be positive, got {inter_node_gbps}")
    return nodes, per_node


def build_topology(text: str, inter_node_gbps: float | None = None) -> Topology:
    """Create every intra- and inter-node group of the layout `text` ('NODESxPER_NODE').

    dist.new_group is itself a collective of the whole world: every rank must create every
    group, the ones it is not in too, in the same order, or the group ids disagree and the
    job hangs. So each rank walks the same lists and keeps the two groups it belongs to.
    (`torch.distributed.device_mesh.init_device_mesh("cpu", (N, G))` builds the same groups
    as its two dimensions; tests/test_comm_topology.py checks that the ranks agree.)"""
    nodes, per_node = check_layout(text, inter_node_gbps, dist.get_world_size())
    rank = dist.get_rank()
    mine = {}
    for desc, layout in (
        (INTRA, node_ranks(nodes, per_node)),
        (INTER, cross_ranks(nodes, per_node)),
    ):
        for ranks in layout:
            group = dist.new_group(ranks, group_desc=desc)
            if rank in ranks:
                mine[desc] = group
    return Topology(nodes, per_node, mine[INTRA], mine[INTER], inter_node_gbps)


def hierarchical_all_reduce(tensor: torch.Tensor, topo: Topology, async_op: bool = False) -> None:
    """Sum `tensor` over all ranks in place: intra-node reduce-scatter, inter-node all-reduce
    of one shard, intra-node all-gather (see the module docstring).

    Each step needs the previous one's result, so the call blocks and returns None, as
    communicate() accepts from a CommOp; `async_op` is taken for that signature only."""
    g = topo.per_node
    n = tensor.numel()
    if n == 0:
        return
    shard = -(-n // g)  # ceil(n / G): the padded tensor splits into G equal shards
    flat = tensor.reshape(-1)
    padded = flat if shard * g == n and flat.is_contiguous() else flat.new_zeros(shard * g)
    if padded is not flat:
        padded[:n] = flat
    mine = padded.new_empty(shard)
    reduce_scatter_single(mine, padded, group=topo.intra)
    dist.all_reduce(mine, group=topo.inter)
    topo.inter_all_reduce_delay(mine.numel() * mine.element_size())
    all_gather_single(padded, mine, group=topo.intra)
    if padded.data_ptr() != tensor.data_ptr():
        tensor.copy_(padded[:n].view_as(tensor))


def flat_all_reduce(tensor: torch.Tensor, topo: Topology, async_op: bool = False) -> None:
    """`dist.all_reduce` over all ranks, delayed as a ring over the N x G layout would be:
    its inter-node links each carry 2(W-1)/W x the tensor, and the ring runs at the speed of
    its slowest link (no delay when every rank is on one node)."""
    dist.all_reduce(tensor)
    if topo.nodes > 1:
        world = topo.nodes * topo.per_node
        topo.link_delay(bus_factor("all_reduce", world) * tensor.numel() * tensor.element_size())


def inter_node_bytes_per_rank(nbytes: int, nodes: int, per_node: int) -> dict[str, float]:
    """What each rank sends over its inter-node link for an all-reduce of `nbytes` on a ring
    (the bytes are a multiple of G x element size; else add the padding):
    hierarchical 2(N-1)/N x S/G, flat 2(W-1)/W x S (0 when N = 1: no link crossed)."""
    world = nodes * per_node
    return {
        "hierarchical": 2 * (nodes - 1) / nodes * nbytes / per_node,
        "flat": 2 * (world - 1) / world * nbytes if nodes > 1 else 0.0,
    }


# The --sync modes that take an `all_reduce` to average with (parallel/allreduce.py,
# overlap.py, local_sgd.py: dist.all_reduce unless given this one).
TOPOLOGY_MODES = ("allreduce", "overlap", "local-sgd")
# The --sync modes that shard inside each node and replicate across nodes (parallel/hsdp.py
# and its twin): the layout is what they shard by, so they need one.
SHARDING_MODES = ("hsdp", "torch-hsdp")


def check_topology_flags(
    text: str | None, inter_node_gbps: float | None, sync_mode: str, world_size: int
) -> None:
    """--topology and --inter-node-gbps against each other, --sync and the world size
    (training/cli.py's validate, before anything is written)."""
    if text is None:
        if sync_mode in SHARDING_MODES:
            raise UsageError(
                f"--sync {sync_mode} needs --topology NODESxPER_NODE: it shards inside each node "
                f"and replicates across nodes (--topology 1x{world_size}: one node, as zero3)"
            )
        if inter_node_gbps is not None:
            raise UsageError("--inter-node-gbps needs --topology: which links are inter-node?")
        return
    if sync_mode not in (*TOPOLOGY_MODES, *SHARDING_MODES):
        modes = ", ".join((*TOPOLOGY_MODES, *SHARDING_MODES))
        raise UsageError(f"--topology applies to --sync {modes}, not --sync {sync_mode}")
    if sync_mode == "torch-hsdp" and inter_node_gbps is not None:
        raise UsageError(
            "--inter-node-gbps does not apply to --sync torch-hsdp: FSDP2 calls its collectives "
            "itself, past the delay (the hand-made --sync hsdp takes it)"
        )
    check_layout(text, inter_node_gbps, world_size)


def topology_all_reduce(text: str | None, inter_node_gbps: float | None) -> CommOp | None:
    """The all-reduce for make_sync under `--topology text` (None without one); the flags were
    checked by check_topology_flags."""
    if text is None:
        return None
    return functools.partial(hierarchical_all_reduce, topo=build_topology(text, inter_node_gbps))
