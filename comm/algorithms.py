"""Two more all-reduce algorithms by hand, beside the ring of comm/ring.py.

Both sum a tensor over the ranks in place with point-to-point messages only, and return this
rank's `Traffic`, which `tree_bytes_sent_by_rank` / `rhd_bytes_sent_by_rank` predict exactly.
Their costs in the alpha-beta model (study/cost_model.py, docs/cost-model.md) are those of Thakur,
Rabenseifner and Gropp, "Optimization of Collective Communication Operations in MPICH" (2005).

Binomial tree (`tree_all_reduce`): reduce to rank 0, then broadcast from it.
    reduce     in round k (k = 0, 1, ...) a rank whose lowest set bit is 2^k sends its partial
               sum to rank - 2^k and drops out; the others receive from rank + 2^k (if it
               exists) and add. After ceil(lg W) rounds rank 0 holds the sum.
    broadcast  the same tree backwards: each rank receives the sum from its parent and sends
               it on to its children, the farthest first.
    Every message is the whole tensor: 2 ceil(lg W) messages on the critical path, each of S
    bytes. Few messages (good for small tensors), but S x lg W bytes through rank 0's link.

Recursive halving / doubling (`rhd_all_reduce`, Rabenseifner's algorithm): on p = 2^k ranks
    reduce-scatter by recursive halving: the tensor is cut into p chunks; in step j a rank
               swaps half of the chunks it is still responsible for with the partner at
               distance p / 2^(j+1) (rank XOR distance), keeps the other half and adds what
               it received into it. After lg p steps rank r holds the sum of chunk r.
    all-gather by recursive doubling: the same exchanges in reverse order (distance 1, 2,
               ..., p/2), each rank sending everything it holds, so the finished block
               doubles every step until every rank has the whole sum.
    Each phase sends (p-1)/p of the tensor per rank, like the ring, in lg p messages instead
    of p-1. When W is not a power of two, the standard fold (MPICH's): with p the largest
    power of two below W and r = W - p, the first 2r ranks pair up; each even one of them
    sends its whole tensor to its odd partner, which adds it, and sits out; the p remaining
    ranks run the algorithm above; at the end each odd partner sends the result back. The
    fold costs one extra whole-tensor message at each end.

Chunks are `comm.ring.chunk_bounds(numel, p)`: any length works, also one below p (some
chunks are then empty and their messages are skipped). Point-to-point ops take global ranks,
so a subgroup's ranks are translated, as in comm/ring.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from comm.ring import Traffic, _exchange_async, chunk_bounds


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of `tensor` when it is contiguous, else a contiguous copy (written back by
    `_write_back`)."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1).clone()


def _write_back(flat: torch.Tensor, tensor: torch.Tensor) -> None:
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _send(t: torch.Tensor, dst: int, group, traffic: Traffic) -> None:
    dist.send(t, dst, group)
    traffic.sent += _nbytes(t)


def _recv(t: torch.Tensor, src: int, group, traffic: Traffic) -> None:
    dist.recv(t, src, group)
    traffic.received += _nbytes(t)


def _lowest_bit(rank: int, world_size: int) -> int:
    """2^k for the lowest set bit of `rank`; for rank 0 (the root) the first power of two
    at or above `world_size`, so that all its rounds are below it."""
    return rank & -rank if rank else 1 << (world_size - 1).bit_length()


def tree_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> Traffic:
    """Sum `tensor` over all ranks in place: binomial-tree reduce to group rank 0, then
    binomial-tree broadcast from it (blocking send/recv: the tree has no cycle to deadlock)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    traffic = Traffic()
    if world == 1 or tensor.numel() == 0:
        return traffic
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    flat = _flat(tensor)
    low = _lowest_bit(rank, world)
    inbox = torch.empty_like(flat)
    mask = 1
    while mask < low and rank + mask < world:  # children rank + 1, rank + 2, rank + 4, ...
        _recv(inbox, ranks[rank + mask], group, traffic)
        flat.add_(inbox)
        mask <<= 1
    if rank:
        _send(flat, ranks[rank - low], group, traffic)  # the partial sum goes to the parent
        _recv(flat, ranks[rank - low], group, traffic)  # and the total comes back
    mask = low >> 1
    while mask:  # the farthest child first: its subtree is the largest
        if rank + mask < world:
            _send(flat, ranks[rank + mask], group, traffic)
        mask >>= 1
    _write_back(flat, tensor)
    return traffic


def tree_bytes_sent_by_rank(numel: int, element_size: int, world_size: int) -> list[int]:
    """What `tree_all_reduce` sends from each rank: the tensor once to its parent (all but
    rank 0) and once to each child (rank r + 2^k below r's lowest set bit and below W).
    In all 2(W-1) tensors, as the ring, but rank 0 alone sends ceil(lg W) of them."""
    nbytes = numel * element_size
    out = []
    for r in range(world_size):
        low = _lowest_bit(r, world_size)
        children = sum(
            1 for k in range(world_size.bit_length()) if 1 << k < low and r + (1 << k) < world_size
        )
        out.append(nbytes * ((r != 0) + children) if world_size > 1 else 0)
    return out


def _fold(world_size: int) -> tuple[int, int]:
    """(p, r): the largest power of two p <= W and the r = W - p ranks folded away."""
    p = 1 << (world_size.bit_length() - 1)
    return p, world_size - p


def rhd_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> Traffic:
    """Sum `tensor` over all ranks in place by Rabenseifner's algorithm: reduce-scatter by
    recursive halving, all-gather by recursive doubling, with MPICH's fold for a world size
    that is not a power of two (see the module docstring)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    traffic = Traffic()
    if world == 1 or tensor.numel() == 0:
        return traffic
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    flat = _flat(tensor)
    n = flat.numel()
    p, extra = _fold(world)

    # Fold: ranks 0, 2, ..., 2r-2 hand their tensor to 1, 3, ..., 2r-1 and wait for the end.
    if rank < 2 * extra and rank % 2 == 0:
        _send(flat, ranks[rank + 1], group, traffic)
        _recv(flat, ranks[rank + 1], group, traffic)
        _write_back(flat, tensor)
        return traffic
    inbox = torch.empty(n, dtype=flat.dtype, device=flat.device)
    if rank < 2 * extra:
        _recv(inbox, ranks[rank - 1], group, traffic)
        flat.add_(inbox)
        me = rank // 2  # this rank's number among the p that take part
    else:
        me = rank - extra

    def real(virtual: int) -> int:
        """The global rank of the participant numbered `virtual`."""
        return ranks[2 * virtual + 1 if virtual < extra else virtual + extra]

    offsets = [a for a, _ in chunk_bounds(n, p)] + [n]  # chunk c is offsets[c]:offsets[c+1]

    def span(lo: int, hi: int) -> torch.Tensor:
        """Chunks lo..hi-1 of the tensor, as one view."""
        return flat[offsets[lo] : offsets[hi]]

    # Reduce-scatter by recursive halving: chunks [lo, hi) are still this rank's concern.
    lo, hi = 0, p
    distance = p // 2
    while distance:
        mid = lo + distance
        keep, give = ((mid, hi), (lo, mid)) if me & distance else ((lo, mid), (mid, hi))
        mine = span(*keep)
        box = inbox[: mine.numel()]
        partner = real(me ^ distance)
        for work in _exchange_async(span(*give), box, partner, partner, group, traffic):
            work.wait()
        mine.add_(box)
        lo, hi = keep
        distance //= 2
    # Now lo == me: this rank holds the finished chunk `me`.

    # All-gather by recursive doubling: swap the finished block with the partner's.
    distance = 1
    while distance < p:
        theirs = (lo - distance, lo) if me & distance else (hi, hi + distance)
        partner = real(me ^ distance)
        for work in _exchange_async(span(lo, hi), span(*theirs), partner, partner, group, traffic):
            work.wait()
        lo, hi = min(lo, theirs[0]), max(hi, theirs[1])
        distance *= 2

    if rank < 2 * extra:  # unfold: the result back to the partner that sat out
        _send(flat, ranks[rank - 1], group, traffic)
    _write_back(flat, tensor)
    return traffic


def rhd_bytes_sent_by_rank(numel: int, element_size: int, world_size: int) -> list[int]:
    """What `rhd_all_reduce` sends from each rank, with c_i the size of chunk i of p:

    - a folded-away rank (even, below 2r): its whole tensor, once;
    - a participant numbered m: in the reduce-scatter everything but its own chunk,
      n - c_m (each step sends what it stops being responsible for); in the all-gather the
      block it holds at each step, the aligned blocks of 1, 2, ..., p/2 chunks around m;
      a fold partner (odd, below 2r) sends the whole result back once more.

    With p | n each phase sends (p-1)/p x the tensor, as the ring's."""
    p, extra = _fold(world_size)
    if world_size == 1:
        return [0]
    bounds = chunk_bounds(numel, p)
    size = [b - a for a, b in bounds]
    out = []
    for r in range(world_size):
        if r < 2 * extra and r % 2 == 0:
            out.append(numel * element_size)
            continue
        m = r // 2 if r < 2 * extra else r - extra
        gather = 0
        block = 1
        while block < p:
            start = m // block * block
            gather += sum(size[start : start + block])
            block *= 2
        fold = numel if r < 2 * extra else 0
        out.append(element_size * (numel - size[m] + gather + fold))
    return out
