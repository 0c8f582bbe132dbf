"""Gradient compression: send fewer bytes per step, pay in computation and accuracy.

Two ways in, as for the rest of comm/: the library's and a hand-made twin of it.

- `--sync ddp --comm-hook {fp16,bf16,powersgd}`: torch's DDP communication hooks
  (torch.distributed.algorithms.ddp_comm_hooks), registered on DDP's reducer by
  `register_comm_hook`. fp16/bf16 cast each gradient bucket to half precision, divide by the
  world size and all-reduce it (half the bytes); powersgd all-reduces two thin matrices per
  weight instead of the weight's gradient.
- `--sync allreduce --compress {bf16,fp16,powersgd}`: the same mechanisms written out here
  (`CastCompressor`, `PowerSGDCompressor`), called by parallel/compressed.py after
  backward in place of its plain all-reduce.

PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019, arXiv:1905.13727), as torch's
`powerSGD_hook` runs it: each gradient is viewed as a matrix M of n x m (`as_matrix`: its
first dimension by all the others), with rank r = min(n, m, R). Those for which the low-rank
factors do not pay (`worth_compressing`, torch's `_should_compress`: (n + m) r x
min_compression_rate >= n m, which takes in every bias and other vector) are all-reduced as
they are, in one collective. For the others, with Q (m x r) the previous step's Q
(warm start) or, at the first compressed step, a random one, both orthonormalised:

    P = M Q             all-reduce P (summed)     orthonormalise P
    Q = M^T P           all-reduce Q, / world     approximation = P Q^T

P spans (approximately) the column space of the ranks' summed M, and P Q^T = P P^T mean(M)
projects the averaged gradient onto it. With r = min(n, m) that projection is the identity
(P or Q is square and orthogonal), and PowerSGD returns the plain average to rounding.

Error feedback (on unless --no-error-feedback) keeps, on each rank, what its own message
left out and adds it to the next step's gradient, so that no part of the gradient is lost
for good, only delayed: residual = (gradient + old residual) - what this rank's message
decompresses to. For a cast, that is its rounding error (times the world size, which the
message was divided by); for PowerSGD, the part of M outside P: M - P (M^T P)^T with this
rank's own M^T P, before the Q all-reduce. Averaged over the ranks, the residual is exactly
what the compression took from the averaged gradient (mean residual = mean(gradient + old
residual) - the approximation that was applied; tests/test_comm_compress.py checks it every
step). torch's hook keeps mean-approximation instead of own-approximation on each rank; the
two differ by a term that sums to zero over the ranks, and since PowerSGD's result depends
on the sum of the ranks' matrices only, both give the same training trajectory.

The settings fixed here, for both twins (torch's hook reads them from PowerSGDState):
- start_powerSGD_iter = 2 (`START_ITER`): the first two synchronising steps are a plain
  all-reduce. torch requires >= 2 with error feedback or warm start, because DDP rebuilds
  its buckets after the first backward; the hand-made one follows, so that the two run the
  same steps.
- warm_start = True: Q carries over from step to step (one power iteration per step),
  which torch and the paper recommend for accuracy and which draws random numbers once.
- min_compression_rate = 2 (torch's default), orthogonalization_epsilon = 0 (torch's
  default; exact, but a matrix whose gradient is entirely zero gives NaNs: add a small
  epsilon where that can happen), random_seed = 0, batch_tensors_with_same_shape = False.
- The random Q is drawn the way the hook draws it, from numpy.random.RandomState(0): one
  torch seed per bucket (here: per step), then one torch.randn per matrix, in the hook's
  order (the bucket's gradients grouped by shape; DDP's rebuilt bucket holds them in the
  order backward makes them ready, which `--sync allreduce` records). With one DDP bucket
  (models under DDP's 1 MiB first bucket) the two twins start from the same Q.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from comm.communicate import communicate, flatten, unflatten
from core.errors import UsageError

CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
START_ITER = 2  # PowerSGDState.start_powerSGD_iter: see the module docstring
MIN_COMPRESSION_RATE = 2.0  # PowerSGDState's default
SEED = 0  # PowerSGDState.random_seed


@dataclass(frozen=True)
class Compression:
    """--comm-hook, --compress, --powersgd-rank and --error-feedback, as parsed (None: unset)."""

    comm_hook: str = "none"
    compress: str = "none"
    powersgd_rank: int | None = None
    error_feedback: bool | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Compression:
        return cls(args.comm_hook, args.compress, args.powersgd_rank, args.error_feedback)

    @property
    def active(self) -> bool:
        return self.comm_hook != "none" or self.compress != "none"

    def check(self, sync: str) -> None:
        """The flags against each other and against `--sync sync`."""
        hook, compress = self.comm_hook, self.compress
        if hook != "none" and sync != "ddp":
            raise UsageError(f"--comm-hook is for --sync ddp (DDP's reducer), not --sync {sync}")
        if compress != "none" and sync != "allreduce":
            raise UsageError(
                f"--compress is for --sync allreduce, not --sync {sync} (use --comm-hook "
                "with --sync ddp)"
            )
        used = compress if compress != "none" else hook
        if self.powersgd_rank is not None and used != "powersgd":
            raise UsageError(
                "--powersgd-rank goes with --comm-hook powersgd or --compress powersgd"
            )
        if self.error_feedback is not None and used == "none":
            raise UsageError("--error-feedback goes with --comm-hook powersgd or --compress")
        if self.error_feedback and hook in CAST_DTYPES:
            raise UsageError(f"--error-feedback: torch's {hook} hook has none (--compress has)")

    def refuse_resume(self, step: int) -> None:
        """Called when a run continues from a checkpoint after `step` optimizer steps."""
        if step and self.active:
            raise UsageError(
                "cannot resume a compressed run: the checkpoint does not hold the "
                "error-feedback residuals and PowerSGD's Q, so it would not continue the same "
                "trajectory"
            )


NO_COMPRESSION = Compression()


def register_comm_hook(model: DDP, c: Compression) -> powerSGD_hook.PowerSGDState | None:
    """Register `--comm-hook` on the DDP model (nothing for none); the PowerSGD state, if any."""
    if c.comm_hook in CAST_DTYPES:
        hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
        model.register_comm_hook(None, hook[c.comm_hook])  # state: the process group
        return None
    if c.comm_hook != "powersgd":
        return None
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=c.powersgd_rank or 1,
        start_powerSGD_iter=START_ITER,
        min_compression_rate=MIN_COMPRESSION_RATE,
        use_error_feedback=c.error_feedback is not False,
        warm_start=True,
        orthogonalization_epsilon=0,
        random_seed=SEED,
    )
    hook = powerSGD_hook.powerSGD_hook
    if dist.get_backend(model.process_group) != "nccl":
        hook = one_bucket_at_a_time(hook)
    model.register_comm_hook(state, hook)
    return state


def one_bucket_at_a_time(hook: Callable) -> Callable:
    """`hook` (torch's powerSGD_hook) made to finish a bucket before DDP hands it the next.

    powerSGD_hook issues the bucket's uncompressed all-reduce itself, then the P and the Q
    all-reduces from callbacks of that future, waiting on each inside the callback. On gloo a
    future completes, and runs its callbacks, on one of the process group's two worker
    threads, while the autograd thread goes on to the next bucket's hook. With two or more DDP
    buckets (a model past DDP's 1 MiB first bucket after its rebuild, or a set bucket cap)
    the order in which the ranks issue their collectives then depends on thread timing and
    differs between ranks: gloo pairs collectives by their issue order, so the ranks sum
    buffers of different sizes ("Received data size doesn't match expected size"), or both
    worker threads block in callbacks waiting for P all-reduces that no free thread can run
    (a hang). Waiting here, on the autograd thread, lets one bucket's chain run at a time, in
    the same order on every rank; the gradients are the same, only the overlap of compressed
    steps with backward is lost. NCCL's futures are complete once the collective is enqueued
    on its stream, so their callbacks run inline, in order, on the issuing thread: there the
    hook is left as torch has it (a wait would stall backward's stream on the all-reduce).
    torch tests the hook's parity on NCCL only (pytorch/pytorch#58467)."""

    # No annotations: DDP compares them with the types themselves, and this module's are
    # strings (`from __future__ import annotations`). DDP looks the argument up as "bucket".
    def serial(state, bucket):
        fut = hook(state, bucket)
        fut.wait()
        return fut

    return serial


# ---- torch's rule: which gradients PowerSGD compresses, and what it sends --------------------


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The hook's matrix view of a gradient: first dimension x the rest (a vector: n x 1)."""
    return t.view(t.shape[0] if t.dim() else 1, -1)


def worth_compressing(
    n: int, m: int, rank: int, min_compression_rate: float = MIN_COMPRESSION_RATE
) -> bool:
    """torch's `_should_compress`, with r = min(n, m, rank)."""
    r = min(n, m, rank)
    return (n + m) * r * min_compression_rate < n * m


def powersgd_elements(
    shapes: list[torch.Size], rank: int, min_compression_rate: float = MIN_COMPRESSION_RATE
) -> int:
    """Elements one rank all-reduces in a compressed step: sum of (n + m) r over the
    compressed matrices plus every element of the others."""
    total = 0
    for shape in shapes:
        n, m = (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)
        r = min(n, m, rank)
        total += (n + m) * r if worth_compressing(n, m, rank, min_compression_rate) else n * m
    return total


# ---- the hand-made twins ------------------------------------------------------------------


# DDP's default bucket caps: its first rebuilt bucket is small, so that its all-reduce starts
# early in backward; the others hold up to 25 MiB (`bucket_cap_mb`).
FIRST_BUCKET_BYTES = dist._DEFAULT_FIRST_BUCKET_BYTES  # 1 MiB
BUCKET_BYTES = 25 * 2**20


def ddp_buckets(grads: list[torch.Tensor], ready_order: list[int] | None) -> list[list[int]]:
    """The buckets DDP's reducer (default caps) all-reduces the gradients in, as lists of
    indices into `grads` (the parameters' order): before its rebuild (`ready_order` None, the
    first synchronising step) one bucket in the parameters' order; after it, buckets filled
    in the order backward made the gradients ready (`ready_order`), as the reducer's
    `rebuild_buckets` fills them. At 3 or more ranks gloo's sum of an element depends on
    its offset in the buffer: a twin of a DDP hook must reduce these very buffers to give
    the hook's bits."""
    if ready_order is None:
        return [list(range(len(grads)))]
    buckets, _ = dist._compute_bucket_assignment_by_size(
        [grads[i] for i in ready_order],
        [FIRST_BUCKET_BYTES, BUCKET_BYTES],
        [False] * len(ready_order),
        ready_order,
    )
    return [list(bucket) for bucket in buckets]


class Compressor:
    """What `--sync allreduce` does with the gradients after backward: here, nothing but the
    plain average (--compress none)."""

    def __init__(self, error_feedback: bool = True) -> None:
        self.error_feedback = error_feedback

    def all_reduce_mean(
        self, grads: list[torch.Tensor], ready_order: list[int] | None = None
    ) -> None:
        """Replace every rank's `grads` by (an approximation of) their average over ranks.
        `ready_order`: the order in which backward makes them ready, once it is known
        (`ddp_buckets`)."""
        communicate(grads, dist.all_reduce, average=True)


class CastCompressor(Compressor):
    """Cast to bf16/fp16, divide by the world size, all-reduce, cast back: torch's
    fp16/bf16_compress_hook in that order, plus optional error feedback of the rounding."""

    def __init__(self, dtype: torch.dtype, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        self.dtype = dtype
        self.residual: torch.Tensor | None = None  # one flat buffer, like the gradients
        self.reductions = 0  # DDP rebuilds its buckets after its first one

    @torch.no_grad()
    def all_reduce_mean(
        self, grads: list[torch.Tensor], ready_order: list[int] | None = None
    ) -> None:
        world = dist.get_world_size()
        flat = flatten(grads)
        if self.error_feedback and self.residual is not None:
            flat += self.residual
        message = flat.to(self.dtype).div_(world)
        if self.error_feedback:
            self.residual = flat - message.to(flat.dtype) * world
        # Elementwise so far, so the parameters' order did as well as the hook's. The sums
        # are not: each of DDP's buckets is one all-reduce, its elements in the bucket's order.
        pieces = _unflatten_dense_tensors(message, grads)
        buckets = ddp_buckets(grads, ready_order if self.reductions else None)
        self.reductions += 1
        for bucket in buckets:
            summed = flatten([pieces[i] for i in bucket])
            dist.all_reduce(summed)  # summed in bf16/fp16: the world's mean, half the bytes
            unflatten(summed.to(flat.dtype), [grads[i] for i in bucket])


def orthonormalise(m: torch.Tensor) -> None:
    """Make the columns of `m` (n x r, r <= n) orthonormal in place, as torch's hook does:
    Gram-Schmidt up to rank 2, QR above (faster there)."""
    r = m.shape[1]
    if r > 2:
        m.copy_(torch.linalg.qr(m).Q)
        return
    for i in range(r):
        col = m[:, i : i + 1]
        col /= torch.linalg.vector_norm(col, dim=0, keepdim=True)
        if i + 1 < r:
            rest = m[:, i + 1 :]
            rest -= (col * rest).sum(dim=0, keepdim=True) * col


class PowerSGDCompressor(Compressor):
    """PowerSGD on the whole gradient list, as torch's hook runs it on one DDP bucket.
    `min_compression_rate` is torch's rule; 0 compresses every gradient (a test's knob: at
    full rank the rule would compress none)."""

    def __init__(
        self,
        rank: int = 1,
        error_feedback: bool = True,
        seed: int = SEED,
        min_compression_rate: float = MIN_COMPRESSION_RATE,
    ) -> None:
        super().__init__(error_feedback)
        self.rank = rank
        self.min_compression_rate = min_compression_rate
        self.rng = np.random.RandomState(seed)
        self.iter = 0  # synchronising steps so far (the hook's state.iter)
        self.qs: list[torch.Tensor] | None = None  # warm start: the previous step's Q
        # Error feedback: one residual per gradient, in the caller's order; zeros for the
        # gradients all-reduced uncompressed, which lose nothing.
        self.residuals: list[torch.Tensor] | None = None

    def _first_qs(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Random Qs drawn as the hook draws them: one seed, then randn per matrix in the
        order of the matrices grouped by shape."""
        by_shape: dict[torch.Size, list[int]] = defaultdict(list)
        for i, mat in enumerate(matrices):
            by_shape[mat.shape].append(i)
        qs: list[torch.Tensor] = [torch.empty(0)] * len(matrices)
        with torch.random.fork_rng(devices=[]):  # leaves the training's RNG alone
            torch.manual_seed(self.rng.randint(1_000_000_000))
            for indices in by_shape.values():
                for i in indices:
                    n, m = matrices[i].shape
                    q = torch.randn(m, min(n, m, self.rank), dtype=matrices[i].dtype)
                    qs[i] = q.to(matrices[i].device)
        return qs

    @torch.no_grad()
    def all_reduce_mean(
        self, grads: list[torch.Tensor], ready_order: list[int] | None = None
    ) -> None:
        self.iter += 1
        if self.iter <= START_ITER:
            communicate(grads, dist.all_reduce, average=True)
            return
        if self.error_feedback:
            if self.residuals is None:
                self.residuals = [torch.zeros_like(g) for g in grads]
            torch._foreach_add_(grads, self.residuals)
        # DDP's bucket order (the ready order; reverse definition order until it is known),
        # so that the random Qs are drawn as the hook draws them.
        order = ready_order if ready_order is not None else range(len(grads) - 1, -1, -1)
        rate = self.min_compression_rate
        split = [worth_compressing(*as_matrix(grads[i]).shape, self.rank, rate) for i in order]
        chosen = [i for i, c in zip(order, split, strict=True) if c]
        plain = [grads[i] for i, c in zip(order, split, strict=True) if not c]
        communicate(plain, dist.all_reduce, average=True)  # exact: nothing left behind
        ms = [as_matrix(grads[i]) for i in chosen]
        if self.qs is None:
            self.qs = self._first_qs(ms)
        for q in self.qs:
            orthonormalise(q)
        ps = [m @ q for m, q in zip(ms, self.qs, strict=True)]
        communicate(ps, dist.all_reduce)  # summed: orthonormalising makes the scale moot
        for p in ps:
            orthonormalise(p)
        own_qs = [m.T @ p for m, p in zip(ms, ps, strict=True)]
        if self.error_feedback:  # what this rank's own P Q^T leaves out of its M
            for i, m, p, q in zip(chosen, ms, ps, own_qs, strict=True):
                as_matrix(self.residuals[i]).copy_(m - p @ q.T)
        self.qs = [q.clone() for q in own_qs]
        communicate(self.qs, dist.all_reduce, average=True)
        for m, p, q in zip(ms, ps, self.qs, strict=True):
            m.copy_(p @ q.T)


def make_compressor(c: Compression) -> Compressor | None:
    """The hand-made compressor of `--compress` (None for none)."""
    error_feedback = c.error_feedback is not False
    if c.compress in CAST_DTYPES:
        return CastCompressor(CAST_DTYPES[c.compress], error_feedback)
    if c.compress == "powersgd":
        return PowerSGDCompressor(c.powersgd_rank or 1, error_feedback)
    return None
