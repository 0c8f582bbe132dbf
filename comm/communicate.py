"""communicate(): run one collective over many tensors by flattening them into one buffer.

    communicate(grads, dist.all_reduce, average=True)            # average gradients
    communicate(params, functools.partial(dist.broadcast, src=0))  # copy rank 0's weights

    views = BucketViews(grads)             # once: the tensors become views of one buffer
    views.communicate(dist.all_reduce)     # every step: one collective, nothing copied

A model has tens to hundreds of parameter tensors, most of them small (biases, norms).
One collective per tensor pays the fixed cost of a collective (a round of messages between
all ranks, a kernel launch, a synchronisation) once per tensor; for a 1 KB tensor that fixed
cost is nearly all of the time. Copying the tensors into one contiguous buffer ("flatten"),
running *one* collective on it and copying the result back ("unflatten") pays it once and
sends large messages, which is what networks and NCCL/gloo ring algorithms are fast at.
DDP's reducer does the same with its gradient buckets.

The copies must not bring the per-tensor cost back. A Python loop of `t.copy_(piece)` costs
one dispatch through the torch operator stack per tensor (~5-10 us on a CPU: 100 small
tensors cost more than the all-reduce of their 832 KB). So each direction is one call into
C++: `torch._utils._flatten_dense_tensors` (one `cat` of the tensors' flat views) and
`torch._foreach_copy_` into the views that `_unflatten_dense_tensors` cuts out of the
buffer. They are private names, but the ones torch.nn.parallel.comm (DataParallel's
coalesced reduce), Megatron-LM and DeepSpeed use for exactly this. What is left is two
passes over the bytes and, inside C++, a view and a copy kernel per tensor (1-3 us each).

`BucketViews` removes even those: it moves each tensor's storage into its bucket's
flat buffer once, with `Tensor.set_`, so that afterwards the collective runs on the buffer and
the tensors already hold the result (DDP's `gradient_as_bucket_view=True` for gradients).

set_ versus copy_, and which one DDP uses
-----------------------------------------
`t.copy_(src)` writes src's values into t's own memory: t keeps its storage, strides and
data_ptr, so every view of t, every reference to t (an optimizer's param list, a dict of
moments) and autograd's record of t stay as they were and simply see the new values. This
is the copying communicate(): nothing about the tensors changes except their values.

`t.set_(view)` keeps the Python object t (same id, still the same Parameter with the same
.grad, so the optimizer's references stay valid) but points it at another storage: t stops
owning its old memory and becomes an alias of `view`, a slice of the flat buffer. Anything
that aliased t's *old* memory is cut loose: a view taken of t before set_ (`t[0]`,
`t.view(-1)`, an earlier `t.data`) keeps reading the old storage and never sees the
collective's result, and a non-contiguous t comes out contiguous (the buffer's layout).
For autograd, set_ is an in-place change of a tensor's metadata: on a leaf that requires
grad it must run under `torch.no_grad()` (as here), and it bumps the version counter, so a
graph that saved t for backward refuses to use it afterwards. Do it once, before training
builds any graph or view of the tensors.

DDP's reducer (torch/csrc/distributed/c10d/reducer.cpp, `mark_variable_ready_dense`) uses
neither on parameters. Each bucket is one flat tensor and `bucket_views_in` are narrow()
views of it. When a gradient is ready DDP *copies* it into its view during backward (with
no comm hook, `at::mul_out(bucket_view, grad, 1/world_size)`: the division rides on the
copy), and after the all-reduce copies the result back into `param.grad`. With
`gradient_as_bucket_view=True` it copies once, then *rebinds the reference*
`param.grad = bucket_view`, so later backwards accumulate straight into the bucket and
nothing is copied (unless `zero_grad(set_to_none=True)` dropped the view, in which case the
next hook copies and rebinds again). Rebinding `.grad` is the set_ idea applied to a
reference instead of to a tensor's storage: the parameter itself is never moved.

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
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# The collective is called as op(buffer, async_op=True) and must work in place on that one
# tensor: dist.all_reduce, dist.broadcast, or a functools.partial of one (op=..., src=...,
# group=...).
CommOp = Callable[..., dist.Work | None]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One new contiguous 1-D buffer holding every tensor's elements, one after the other
    (one call into C++, which takes each tensor's flat view, or a contiguous copy of a
    non-contiguous one, and concatenates them)."""
    return _flatten_dense_tensors(list(tensors))


def unflatten(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive pieces of `flat` back into `tensors`, in place: the tensors stay the
    same objects (their storage and strides are untouched), so views of them see the new
    values and non-contiguous tensors are written through their own strides. One foreach
    call copies every piece."""
    tensors = list(tensors)
    torch._foreach_copy_(tensors, _unflatten_dense_tensors(flat, tensors))


def plan_buckets(
    tensors: Iterable[torch.Tensor], bucket_bytes: int | None, first_bucket_bytes: int | None = None
) -> list[list[int]]:
    """Group tensor indices into buckets of one dtype and device, in order, each at most
    `bucket_bytes` (a tensor larger than the cap gets a bucket of its own). The first bucket
    of each dtype/device may have a smaller cap, as DDP's first bucket does, so that the
    first collective starts early. `bucket_bytes=None`: one bucket per dtype and device."""
    if bucket_bytes is None and first_bucket_bytes is None:
        # The common case, kept to one cheap pass: communicate() plans on every call.
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            by_key.setdefault((t.dtype, t.device), []).append(i)
        return list(by_key.values())
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


def plan_buckets_like_ddp(
    tensors: Iterable[torch.Tensor], bucket_bytes: int, first_bucket_bytes: int | None = None
) -> list[list[int]]:
    """DDP's bucket assignment (reducer.cpp, `compute_bucket_assignment_by_size`): a tensor
    joins the open bucket of its dtype and device, and that bucket closes as soon as it holds
    `bucket_bytes` or more (`first_bucket_bytes` for the first one). Unlike `plan_buckets`, a
    bucket overshoots its cap by its last tensor rather than closing early, so a large tensor
    joins the small ones before it instead of pushing them into a bucket of their own, and
    the final bucket, the one backward finishes last and nobody can hide, is what is left.
    Buckets come out in the order they closed, then the open ones."""
    limits: dict[tuple[torch.dtype, torch.device], int] = {}
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], list[int]]] = {}
    buckets: list[list[int]] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        if key not in limits:
            limits[key] = first_bucket_bytes if first_bucket_bytes is not None else bucket_bytes
        indices, size = open_buckets.setdefault(key, ([], [0]))
        indices.append(i)
        size[0] += t.numel() * t.element_size()
        if size[0] >= limits[key]:
            buckets.append(indices)
            del open_buckets[key]
            limits[key] = bucket_bytes
    buckets += [indices for indices, _ in open_buckets.values()]
    return buckets


def _group(op: CommOp) -> dist.ProcessGroup | None:
    """The group the op runs on: the `group=` of a functools.partial, else None (WORLD)."""
    return op.keywords.get("group") if isinstance(op, functools.partial) else None


@dataclass
class _Bucket:
    tensors: list[torch.Tensor]
    buffer: torch.Tensor  # the flat copy, the tensor itself, or a BucketViews buffer
    work: dist.Work | None
    copy_back: bool  # False: the tensors are `buffer` or views of it, already up to date


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
                if b.copy_back:
                    unflatten(b.buffer, b.tensors)
        self._buckets = []


def _divisor(tensors: Sequence[torch.Tensor], op: CommOp, average: bool) -> int | None:
    """The group size to divide by when averaging (None: no division); -1 when this rank is
    not in the op's group. Refuses to average integer tensors."""
    if average:
        ints = sorted(
            {str(t.dtype) for t in tensors if not (t.is_floating_point() or t.is_complex())}
        )
        if ints:
            raise TypeError(f"average=True needs floating-point tensors, got {', '.join(ints)}")
    group = _group(op)
    if dist.get_rank(group) < 0:
        return -1
    return dist.get_world_size(group) if average else None


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
    divisor = _divisor(tensors, communication_op, average)
    if divisor == -1:
        # This rank is not in the op's group: torch makes the collective a no-op here (and
        # reports a group size of -1, which would negate the tensors when averaging).
        # Nothing is sent and nothing is written.
        return PendingCommunication([], None)
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
            buckets.append(_Bucket(members, buffer, work, copy_back=buffer is not members[0]))
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


class BucketViews:
    """The persistent mode: `tensors` become views of flat bucket buffers, once, so that each
    later communication is one collective per bucket and no copy at all.

    On construction every tensor's current values are copied into its bucket's buffer and
    the tensor is re-pointed there with `set_` (see the module docstring for what that does
    to earlier views and to autograd: construct it before any view or graph uses the
    tensors). The tensors stay the same Python objects, so the model and the optimizer that
    hold them need not know. Buckets follow `plan_buckets`; empty tensors are left alone.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], bucket_bytes: int | None = None) -> None:
        tensors = [t for t in tensors if t.numel() > 0]
        self.buckets: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        with torch.no_grad():
            for indices in plan_buckets(tensors, bucket_bytes):
                members = [tensors[i] for i in indices]
                buffer = flatten(members)
                for t, view in zip(members, _unflatten_dense_tensors(buffer, members), strict=True):
                    t.set_(view)
                self.buckets.append((members, buffer))

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The flat buffers, one per bucket, that the tensors are views of."""
        return [buffer for _, buffer in self.buckets]

    def communicate_async(
        self, communication_op: CommOp, *, average: bool = False
    ) -> PendingCommunication:
        """Launch the collective on every buffer; `.wait()` before reading the tensors."""
        divisor = _divisor(self.buffers, communication_op, average)
        if divisor == -1:  # not in the op's group: see communicate_async
            return PendingCommunication([], None)
        with torch.no_grad():
            buckets = [
                _Bucket(members, buffer, communication_op(buffer, async_op=True), False)
                for members, buffer in self.buckets
            ]
        return PendingCommunication(buckets, divisor)

    def communicate(self, communication_op: CommOp, *, average: bool = False) -> None:
        """`communicate()` on the tensors, as one collective per bucket and no copies."""
        self.communicate_async(communication_op, average=average).wait()
