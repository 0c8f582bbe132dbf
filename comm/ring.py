"""A ring all-reduce written by hand, to show what `dist.all_reduce` does on the wire.

The W ranks stand in a ring; rank r sends only to its right neighbour (r+1) % W and receives
only from its left neighbour (r-1) % W. The tensor is cut into W chunks (sizes differ by at
most one element, so any length works) and the sum is built in two phases:

    reduce-scatter  W-1 steps: send one chunk right, add the chunk arriving from the left to
                    your own copy of it. Afterwards rank r holds the complete sum of chunk
                    (r+1) % W.
    all-gather      W-1 steps: pass the finished chunks around the ring, each rank copying
                    what arrives, until every rank holds every summed chunk.

Each rank sends 2(W-1) chunks, about 2(W-1)/W of the tensor, whatever the world size: the
reason rings scale. The naive alternative (everyone sends to a root, the root sums and sends
the result back) moves the same total, but the root alone sends (W-1) whole tensors, so it
becomes the bottleneck as W grows. Both functions return how many bytes this rank sent and
received, which `ring_bytes_sent_by_rank` / `naive_bytes_sent_by_rank` predict exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Bytes one rank put on and took off the wire in one all-reduce."""

    sent: int = 0
    received: int = 0


def chunk_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of each of the W chunks; the first numel % W chunks get one extra element.
    Chunks may be empty when numel < W."""
    base, extra = divmod(numel, world_size)
    bounds, start = [], 0
    for i in range(world_size):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


# Segments of this many bytes (rounded to whole elements) pipeline each ring step: see
# ring_all_reduce. Each segment costs a round trip through gloo's transport thread and a
# wake-up of this one; on a loaded 2-core box a wake-up can take a scheduler time slice, so
# segments pay off only when they are large: `python -m benchmarks.bench_goals --skip
# communicate overlap --segment-kib N` compares sizes (docs/communication-performance.md).
SEGMENT_BYTES = 4 * 2**20
PIPELINE_DEPTH = 4  # segment exchanges in flight at once

_WORKSPACES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of at least `numel` elements, reused from call to call (grown when needed)."""
    buffer = _WORKSPACES.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _exchange_async(
    send: torch.Tensor, recv: torch.Tensor, right: int, left: int, group, traffic: Traffic
) -> list[dist.Work]:
    """Start sending to the right and receiving from the left at the same time; return the
    work handles. batch_isend_irecv issues both as one group: on NCCL a lone blocking send
    could wait forever for a peer that is itself blocked in its own send."""
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, right, group))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, left, group))
    traffic.sent += send.numel() * send.element_size()
    traffic.received += recv.numel() * recv.element_size()
    return dist.batch_isend_irecv(ops) if ops else []


def segment_count(numel: int, world_size: int, element_size: int, segment_bytes: int) -> int:
    """How many segments each chunk is cut into: enough that the largest chunk's segments
    hold at most `segment_bytes` (and at least one element)."""
    largest = -(-numel // world_size)  # chunk_bounds' first chunk
    per_segment = max(segment_bytes // element_size, 1)
    return max(-(-largest // per_segment), 1)


def ring_all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    segment_bytes: int = SEGMENT_BYTES,
) -> Traffic:
    """Sum `tensor` over all ranks in place, by reduce-scatter then all-gather around a ring,
    pipelined in segments of about `segment_bytes`.

    Chunk sizes follow `chunk_bounds`, so the two phases agree on them on every rank. Both
    neighbours of a rank are given as global ranks, which is what point-to-point ops take.

    Pipelining: each chunk is cut into the same number of segments (`segment_count`,
    `chunk_bounds` again inside the chunk, so sender and receiver agree). The 2(W-1) steps
    x nseg segments form one stream of exchanges, item i = (step i // nseg, segment
    i % nseg), and what item i + nseg sends is exactly what item i has just received (and,
    in the reduce-scatter, added). `PIPELINE_DEPTH` items are in flight at once: when item i
    is done, item i + depth starts, so the add of one segment overlaps the transfer of the
    next ones, as in gloo's and NCCL's rings. Every element still goes through the same
    additions in the same order as without segments (the result is bit-identical), and each
    byte is sent as often as before: 2(W-1)/W of the tensor per rank.

    The reduce-scatter receives into `depth` segment-sized inboxes (item i uses inbox
    i % depth, free again once item i - depth was added), kept between calls (`_workspace`):
    a fresh buffer of that size would be page-faulted in on every call, which costs as much
    as the transfer itself. So calls from several threads at once are not supported.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    traffic = Traffic()
    if world == 1:
        return traffic
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    right, left = ranks[(rank + 1) % world], ranks[(rank - 1) % world]
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()
    bounds = chunk_bounds(flat.numel(), world)
    nseg = segment_count(flat.numel(), world, flat.element_size(), segment_bytes)
    # segments[c][k]: segment k of chunk c.
    segments = [[flat[a + i : a + j] for i, j in chunk_bounds(b - a, nseg)] for a, b in bounds]
    depth = min(nseg, PIPELINE_DEPTH)
    largest = segments[0][0].numel()  # chunk 0 and its segment 0 are the largest
    space = _workspace(depth * largest, flat.dtype, flat.device)
    inboxes = [space[d * largest : (d + 1) * largest] for d in range(depth)]
    items = 2 * (world - 1) * nseg

    def chunks(g: int) -> tuple[int, int]:
        """(chunk sent, chunk received) at step g. Reduce-scatter, steps 0..W-2: send the
        partial sum of chunk r - g, receive chunk r - g - 1 and add your own contribution
        to it; afterwards chunk r + 1 has passed through every rank. All-gather, step
        W-1+s: forward the finished chunk r + 1 - s, receive the finished chunk r - s."""
        s = g if g < world - 1 else g - (world - 1)
        shift = 0 if g < world - 1 else 1
        return (rank - s + shift) % world, (rank - s - 1 + shift) % world

    def start(i: int) -> tuple[int, list[dist.Work]]:
        g, k = divmod(i, nseg)
        out, into = chunks(g)
        into_seg = segments[into][k]
        # Reduce-scatter receives into an inbox (to add), all-gather straight into place.
        target = inboxes[i % depth][: into_seg.numel()] if g < world - 1 else into_seg
        return i, _exchange_async(segments[out][k], target, right, left, group, traffic)

    in_flight = deque(start(i) for i in range(depth))
    while in_flight:
        i, works = in_flight.popleft()
        for work in works:
            work.wait()
        g, k = divmod(i, nseg)
        if g < world - 1:
            into_seg = segments[chunks(g)[1]][k]
            into_seg.add_(inboxes[i % depth][: into_seg.numel()])
        if i + depth < items:
            in_flight.append(start(i + depth))

    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))
    return traffic


def naive_all_reduce(
    tensor: torch.Tensor, root: int = 0, group: dist.ProcessGroup | None = None
) -> Traffic:
    """Sum `tensor` over all ranks in place the simple way: every rank sends its whole tensor
    to `root` (a group rank), the root adds them up and sends the sum back to each rank."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    nbytes = tensor.numel() * tensor.element_size()
    flat = tensor.contiguous()
    if rank == root:
        others = [r for r in range(world) if r != root]
        inbox = [torch.empty_like(flat) for _ in others]
        works = [dist.irecv(buf, ranks[r], group) for buf, r in zip(inbox, others, strict=True)]
        for work, buf in zip(works, inbox, strict=True):
            work.wait()
            flat.add_(buf)
        for work in [dist.isend(flat, ranks[r], group) for r in others]:
            work.wait()
        moved = nbytes * len(others)
        traffic = Traffic(sent=moved, received=moved)
    else:
        dist.send(flat, ranks[root], group)
        dist.recv(flat, ranks[root], group)
        traffic = Traffic(sent=nbytes, received=nbytes)
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat)
    return traffic


def ring_bytes_sent_by_rank(numel: int, element_size: int, world_size: int) -> list[int]:
    """What `ring_all_reduce` sends from each rank: every chunk but one in each phase.

    Rank r skips chunk r+1 in the reduce-scatter (it is the one r finishes) and chunk r+2 in
    the all-gather (the one it receives last). With W | numel this is 2(W-1)/W x the tensor
    bytes on every rank; summed over ranks it is exactly 2(W-1) x the tensor bytes."""
    if world_size == 1:
        return [0]
    size = [b - a for a, b in chunk_bounds(numel, world_size)]
    return [
        element_size * (2 * numel - size[(r + 1) % world_size] - size[(r + 2) % world_size])
        for r in range(world_size)
    ]


def naive_bytes_sent_by_rank(
    numel: int, element_size: int, world_size: int, root: int = 0
) -> list[int]:
    """What `naive_all_reduce` sends from each rank: W-1 tensors from the root, one from the
    rest. The same 2(W-1) tensors in total as the ring, but all of the root's on one link."""
    nbytes = numel * element_size
    return [nbytes * (world_size - 1) if r == root else nbytes for r in range(world_size)]


# Bytes each rank sends, as a multiple of the collective's size S, when the collective runs
# on a bandwidth-optimal ring (nccl-tests' "bus bandwidth" factors). S is the all-reduce
# tensor, the all-gather *output*, the reduce-scatter *input*, the all-to-all input.
def bus_factor(op: str, world_size: int) -> float:
    n = world_size
    if op in ("all_reduce", "ring_all_reduce"):
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all", "gather", "scatter"):
        return (n - 1) / n
    if op in ("broadcast", "reduce", "send"):
        return 1.0
    if op in ("naive_all_reduce", "tree_all_reduce", "rhd_all_reduce"):
        # nccl-tests' all-reduce factor whatever the algorithm, so that busbw compares them
        return 2 * (n - 1) / n
    return 0.0  # recv, barrier: this rank sends nothing of its own
