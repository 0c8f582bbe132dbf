"""communicate(): run one collective over many tensors by flattening them into one buffer.

    communicate(grads, dist.all_reduce, average=True)            # average gradients
    communicate(params, functools.partial(dist.broadcast, src=0))  # copy rank 0's weights

A model has tens to hundreds of parameter tensors, most of them small (biases, norms).
One collective per tensor pays the fixed cost of a collective (a round of messages between
all ranks, a kernel launch, a synchronisation) once per tensor; for a 1 KB tensor that fixed
cost is nearly all of the time. Copying the tensors into one contiguous buffer ("flatten"),
running *one* collective on it and copying the result back ("unflatten") pays it once and
sends large messages, which is what networks and NCCL/gloo ring algorithms are fast at.
The copies are cheap next to that: memory bandwidth is far above network bandwidth.
DDP's reducer does the same with its gradient buckets.

flatten / unflatten are written here with torch.cat and Tensor.copy_ rather than torch's
private torch._utils._flatten_dense_tensors / _unflatten_dense_tensors: those return views
of the flat buffer that still have to be copied into the original tensors, they are not a
public API, and the two lines below show the whole mechanism.

A size cap (`bucket_bytes`) splits the flat buffer into buckets. Every bucket's collective
is launched with async_op=True before any is waited for, so several are in flight at once
and the copy-back of the first overlaps the transfer of the next.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The collective is called as op(buffer, async_op=True) and must work in place on that one
# tensor: dist.all_reduce, dist.broadcast, or a functools.partial of one (op=..., src=...,
# group=...).
CommOp = Callable[..., dist.Work | None]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One new contiguous 1-D buffer holding every tensor's elements, one after the other.
    reshape(-1) is a free view for a contiguous tensor and a copy for a non-contiguous one."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of `flat` back into `tensors`, in place: the tensors stay the
    same objects (their storage and strides are untouched), so views of them see the new
    values and non-contiguous tensors are written through their own strides."""
    pieces = flat.split([t.numel() for t in tensors])
    for t, piece in zip(tensors, pieces, strict=True):
        t.copy_(piece.view(t.shape))


def plan_buckets(
    tensors: Iterable[torch.Tensor], bucket_bytes: int | None, first_bucket_bytes: int | None = None
) -> list[list[int]]:
    """Group tensor indices into buckets of one dtype and device, in order, each at most
    `bucket_bytes` (a tensor larger than the cap gets a bucket of its own). The first bucket
    of each dtype/device may have a smaller cap, as DDP's first bucket does, so that the
    first collective starts early. `bucket_bytes=None`: one bucket per dtype and device."""
    open_buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    first_done: set[tuple[torch.dtype, torch.device]] = set()
    buckets: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        cap = bucket_bytes
        if first_bucket_bytes is not None and key not in first_done:
            cap = first_bucket_bytes
        bucket = open_buckets.get(key)
        if bucket is not None and cap is not None and sizes[key] + nbytes > cap:
            first_done.add(key)
            bucket = None
        if bucket is None:
            bucket = open_buckets[key] = []
            sizes[key] = 0
            buckets.append(bucket)
        bucket.append(i)
        sizes[key] += nbytes
    return buckets


def _group(op: CommOp) -> dist.ProcessGroup | None:
    """The group the op runs on: the `group=` of a functools.partial, else None (WORLD)."""
    return op.keywords.get("group") if isinstance(op, functools.partial) else None


@dataclass
class _Bucket:
    tensors: list[torch.Tensor]
    buffer: torch.Tensor  # the flat copy, or the tensor itself when it can be sent as it is
    work: dist.Work | None


class PendingCommunication:
    """Collectives that are in flight. `wait()` waits for each one and only then copies its
    result back: reading a buffer before its work handle completed reads whatever part of the
    collective happened to have arrived (on GPUs, possibly nothing at all)."""

    def __init__(self, buckets: list[_Bucket], divisor: int | None) -> None:
        self._buckets = buckets
        self._divisor = divisor

    def wait(self) -> None:
        with torch.no_grad():
            for b in self._buckets:
                if b.work is not None:
                    b.work.wait()
                if self._divisor is not None:
                    b.buffer.div_(self._divisor)
                if b.buffer is not b.tensors[0]:
                    unflatten(b.buffer, b.tensors)
        self._buckets = []


def communicate_async(
    tensors: Sequence[torch.Tensor],
    communication_op: CommOp,
    *,
    average: bool = False,
    bucket_bytes: int | None = None,
) -> PendingCommunication:
    """Launch `communication_op` on `tensors` (flattened, bucketed) and return at once; call
    `.wait()` on the result before reading the tensors. See `communicate`."""
    tensors = list(tensors)
    if average:
        ints = sorted(
            {str(t.dtype) for t in tensors if not (t.is_floating_point() or t.is_complex())}
        )
        if ints:
            raise TypeError(f"average=True needs floating-point tensors, got {', '.join(ints)}")
    group = _group(communication_op)
    if dist.get_rank(group) < 0:
        # This rank is not in the op's group: torch makes the collective a no-op here (and
        # reports a group size of -1, which would negate the tensors when averaging).
        # Nothing is sent and nothing is written.
        return PendingCommunication([], None)
    divisor = dist.get_world_size(group) if average else None
    tensors = [t for t in tensors if t.numel() > 0]  # nothing to send, nothing to write
    buckets = []
    with torch.no_grad():  # parameters are leaves that require grad: copy into them freely
        for indices in plan_buckets(tensors, bucket_bytes):
            members = [tensors[i] for i in indices]
            if len(members) == 1 and members[0].is_contiguous():
                buffer = members[0]  # nothing to gain from a copy: send the tensor itself
            else:
                buffer = flatten(members)
            work = communication_op(buffer, async_op=True)
            buckets.append(_Bucket(members, buffer, work))
    return PendingCommunication(buckets, divisor)


def communicate(
    tensors: Sequence[torch.Tensor],
    communication_op: CommOp,
    *,
    average: bool = False,
    bucket_bytes: int | None = None,
) -> None:
    """Run `communication_op` on every tensor in `tensors`, in place, as few collectives.

    The tensors are flattened into one contiguous buffer per (dtype, device), or into
    several buckets of at most `bucket_bytes` each; every bucket's collective is launched
    with async_op=True, then each is waited for and its result copied back into the
    original tensors. Mixed shapes, dtypes and devices, non-contiguous tensors and an empty
    list are fine; the tensors must not overlap in memory. `average=True` divides the
    results by the size of the op's process group (all_reduce sums; averaging is what
    gradient synchronisation wants; gloo has no ReduceOp.AVG). On a rank outside the op's
    group it does nothing, as the collective itself does.

    Every rank must call it with the same number, shapes, dtypes and order of tensors, as
    for any collective.
    """
    communicate_async(tensors, communication_op, average=average, bucket_bytes=bucket_bytes).wait()
