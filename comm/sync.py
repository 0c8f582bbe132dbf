"""Gradient synchronisation strategies behind `train_ddp.py --sync`.

A strategy holds the model that the training loop calls (for ddp and torch-zero1, the DDP
model that train_ddp.py built in plain sight) and decides when gradients (or parameters) cross the
network. The loop only ever does:

    with sync.no_sync():            # micro-steps of gradient accumulation, except the last
        loss(sync.model(x)).backward()
    loss(sync.model(x)).backward()  # the last micro-step
    sync.finish_backward()          # gradients are averaged across ranks when this returns
    optimizer.step()
    sync.after_step(optimizer)
    with sync.consolidated(optimizer):  # evaluation, checkpoints
        ...

The modes, from the library's to the most hand-made:

- `ddp`: DistributedDataParallel's own reducer, the reference every other mode is tested
  against.
- `allreduce`: a plain model; after backward, one `communicate()` call averages every
  gradient. Correct and simple, but the network idles during backward and backward idles
  during the all-reduce.
- `overlap`: what DDP does, in Python. Gradients are grouped into buckets (in reverse
  order of definition, roughly the order backward produces them); a hook on each parameter
  counts the gradients that are ready and launches a bucket's all-reduce the moment its
  last gradient arrives, while backward goes on computing the earlier layers.
  `finish_backward()` waits for the buckets still in flight.
- `local-sgd`: no gradient is communicated at all. Every rank steps on its own gradients
  and every K optimizer steps the replicas are averaged: parameters, floating-point
  buffers and the optimizer's per-parameter state (SGD momentum). K = 1 with plain SGD is
  the same computation as the other modes; larger K trades accuracy per step for K times
  less communication.
- The sharded modes, each on its own page: `zero1` (optimizer state sharded), `zero2` (and
  gradients), `zero3` (and parameters, gathered per module while in use), and their library
  twins `torch-zero1` (ZeroRedundancyOptimizer) and `fsdp2` (fully_shard). The optimizer
  comes from `sync.make_optimizer()`, since each rank steps only its own shard.

Every mode starts from rank 0's parameters and buffers (DDP broadcasts them when it wraps
the model; the others call `broadcast_state`), so replicas are equal even if a rank's
initialisation differed. `consolidated()` gives every rank the same model for evaluation
and checkpoints without changing what training does next.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from comm.clip import clip_grad_norm_
from comm.communicate import (
    CommOp,
    PendingCommunication,
    communicate,
    communicate_async,
    plan_buckets_like_ddp,
)
from comm.compress import (
    NO_COMPRESSION,
    Compression,
    add_compress_flags,
    make_compressor,
    register_comm_hook,
)
from comm.dist import DistEnv, UsageError
from comm.topology import add_topology_flags
from training.cli import positive

# The sharded modes (ZeRO-1/2/3 by hand and their library twins) live in their own pages:
# comm/zero1.py, comm/zero2.py, comm/zero3.py, comm/torch_sharded.py.
SHARDED_MODES = ("zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
SYNC_MODES = ("ddp", "allreduce", "overlap", "local-sgd", *SHARDED_MODES)

# DDP's default bucket sizes: 25 MiB buckets, and a 1 MiB first one (the gradients that
# backward produces first), so that the first all-reduce can start early.
BUCKET_BYTES = 25 * 2**20
FIRST_BUCKET_BYTES = 2**20
LOCAL_SGD_EVERY = 4  # --sync-every when it is not given


class Sync:
    """Base strategy: the model is used as it is and nothing is communicated."""

    # True for the modes where each rank holds only a shard of the training state: their
    # checkpoints are written shard by shard (training/sharded.py).
    sharded = False
    # make_sync's `all_reduce`: --topology's hierarchical one (comm/topology.py).
    custom_all_reduce: CommOp | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.syncing = True  # False inside no_sync(): the micro-steps of an accumulation

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward of an accumulation micro-step: no gradient is communicated."""
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def make_optimizer(self, cls: type[torch.optim.Optimizer], kwargs: dict):
        """The optimizer `cls(params, **kwargs)` over what this rank steps: every parameter
        here, only this rank's shard in the sharded modes."""
        return cls(self.model.parameters(), **kwargs)

    def finish_backward(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        """What allreduce, overlap and local-sgd sum with: dist.all_reduce (looked up at each
        call, so that comm/tracer.py sees it) unless make_sync was given another."""
        return (self.custom_all_reduce or dist.all_reduce)(tensor, async_op=async_op)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """After finish_backward(): clip the gradients the optimizer steps by their global
        2-norm and return the norm before clipping (comm/clip.py: what each mode pays).
        Here every rank holds whole gradients (local-sgd: its own), so nothing is sent."""
        return clip_grad_norm_(self.model.parameters(), max_norm)

    def after_step(self, optimizer) -> None:
        pass

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        """Inside the block every rank holds the same model, parameters and buffers: the one
        to evaluate, save or report (the checkpoint holds rank 0's copy). Training goes on
        afterwards exactly as if the block had not run, so evaluating or saving a checkpoint
        never changes the trajectory."""
        yield

    def rank_state(self, optimizer) -> dict:
        """What a checkpoint must keep of this rank besides the shared model (local-sgd: the
        replica it is training alone)."""
        return {}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        """Continue from a checkpoint: this rank's `rank_state()` (None when the checkpoint
        has none for it) and the number of optimizer steps already taken."""


def broadcast_state(model: nn.Module) -> None:
    """Overwrite every rank's parameters and buffers with rank 0's, as DDP does on wrapping."""
    state = [*model.parameters(), *model.buffers()]
    communicate(state, functools.partial(dist.broadcast, src=0))


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) replace everyone's."""
    buffers = list(model.buffers())
    if buffers:
        communicate(buffers, functools.partial(dist.broadcast, src=0))


class DDPSync(Sync):
    """DistributedDataParallel: broadcasts rank 0's parameters and buffers when it wraps the
    model, then all-reduces gradient buckets from autograd hooks while backward is still
    running, so communication overlaps computation.

    `model` is a DDP model (train_ddp.py wraps it in plain sight) or a plain module, which
    is wrapped here (benchmarks, tests; `bucket_bytes` sets DDP's bucket cap then).
    `compression.comm_hook` registers one of torch's compression hooks (comm/compress.py)."""

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        bucket_bytes: int | None = None,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        if isinstance(model, DDP):
            if bucket_bytes is not None:
                raise ValueError("bucket_bytes: the model is already wrapped, with its own cap")
        else:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            kwargs = {} if bucket_bytes is None else {"bucket_cap_mb": bucket_bytes / 2**20}
            model = DDP(model, device_ids=device_ids, **kwargs)
        super().__init__(model)
        self.compression = compression
        register_comm_hook(model, compression)

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.compression.refuse_resume(step)

    def no_sync(self) -> AbstractContextManager:
        # Forward *and* backward must run inside no_sync(): DDP decides during forward
        # whether the coming backward reduces gradients.
        return self.model.no_sync()

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        # Each rank's BatchNorm statistics have moved with its own last batch. DDP replaces
        # them with rank 0's before the next training forward anyway; doing it now makes
        # every rank evaluate the model that the checkpoint holds.
        broadcast_buffers(self.model.module)
        yield


class GradientSync(Sync):
    """What the hand-made modes that average gradients every step share with DDP: they start
    from rank 0's parameters and buffers, and broadcast rank 0's buffers when DDP would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        broadcast_state(model)
        self._buffers_due = True
        if any(True for _ in model.buffers()):  # models without buffers pay nothing
            model.register_forward_pre_hook(self._before_forward)
            model.register_forward_hook(self._after_forward)

    # DDP (broadcast_buffers=True) broadcasts rank 0's buffers before a training forward
    # that follows a synchronising one (torch/nn/parallel/distributed.py,
    # require_forward_param_sync): with --grad-accum K, at the first of the K micro-steps
    # of every optimizer step, not at each. Forwards in eval mode (evaluation) never
    # communicate: the ranks' eval shards differ in length.
    def _before_forward(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and self._buffers_due:
            broadcast_buffers(module)

    def _after_forward(self, module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._buffers_due = self.syncing

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        broadcast_buffers(self.model)  # as DDPSync: what the next training forward does
        yield


def gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients; a parameter that got none gets zeros, so that every rank
    hands the collective the same list of tensors."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


class AllReduceSync(GradientSync):
    """Backward runs undisturbed; then one communicate() averages all gradients at once (or
    a compressor of comm/compress.py averages an approximation of them: --compress)."""

    def __init__(
        self,
        model: nn.Module,
        bucket_bytes: int | None = None,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        super().__init__(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bucket_bytes = bucket_bytes
        self.compression = compression
        self.compressor = make_compressor(compression)

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.compression.refuse_resume(step)

    def finish_backward(self) -> None:
        if self.compressor is not None:
            self.compressor.all_reduce_mean(gradients(self.params))
            return
        communicate(
            gradients(self.params), self.all_reduce, average=True, bucket_bytes=self.bucket_bytes
        )


class OverlapSync(GradientSync):
    """Bucketed all-reduce launched from gradient hooks during backward, as DDP does.

    The buckets follow DDP's reducer, because they decide how much communication is left
    when backward ends: DDP's size rule (`plan_buckets_like_ddp`: a bucket closes once it
    reaches its cap, so the last one holds only what remains; on resnet18 9 MB instead of
    the 24 MB a close-before-the-cap rule leaves), and DDP's rebuild: after the first
    synchronising backward the buckets are planned again in the order the gradients actually
    became ready, which rank 0 broadcasts so that every rank launches the same buckets.
    """

    def __init__(
        self,
        model: nn.Module,
        bucket_bytes: int = BUCKET_BYTES,
        first_bucket_bytes: int = FIRST_BUCKET_BYTES,
    ) -> None:
        super().__init__(model)
        self.bucket_bytes, self.first_bucket_bytes = bucket_bytes, first_bucket_bytes
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        # Until a backward has shown the real order, assume backward produces the gradients
        # in reverse order of definition (the last layer's first).
        self._plan(self.params[::-1])
        self._ready_order: list[int] | None = []  # None once the buckets were rebuilt
        self._launched: list[PendingCommunication] = []
        for p in self.params:
            # Runs once p.grad holds this backward's whole gradient (after accumulation,
            # also when p is used several times in forward): DDP's hook point too.
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _plan(self, ordered: list[nn.Parameter]) -> None:
        plan = plan_buckets_like_ddp(ordered, self.bucket_bytes, self.first_bucket_bytes)
        self.buckets = [[ordered[i] for i in bucket] for bucket in plan]
        self._bucket_of = {id(p): k for k, bucket in enumerate(self.buckets) for p in bucket}
        self._ready = [0] * len(self.buckets)

    @property
    def in_flight(self) -> int:
        """Buckets launched in this backward and not yet waited for."""
        return len(self._launched)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.syncing:
            return
        if self._ready_order is not None:
            self._ready_order.append(self._position[id(param)])
        self._ready[self._bucket_of[id(param)]] += 1
        # Launch strictly in bucket order: every rank must issue its collectives in the same
        # order, and gradients may become ready in a different order on different ranks.
        while self.in_flight < len(self.buckets) and self._all_ready(self.in_flight):
            self._launch(self.in_flight)

    def _all_ready(self, index: int) -> bool:
        return self._ready[index] == len(self.buckets[index])

    def _launch(self, index: int) -> None:
        grads = gradients(self.buckets[index])
        self._launched.append(communicate_async(grads, self.all_reduce, average=True))

    def _rebuild(self) -> None:
        """Plan the buckets again in rank 0's gradient-ready order (parameters that got no
        gradient go last), as DDP's reducer does once after its first backward."""
        order = list(dict.fromkeys(self._ready_order or []))
        seen = set(order)
        order += [i for i in reversed(range(len(self.params))) if i not in seen]
        agreed = torch.tensor(order, dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(agreed, src=0)
        self._plan([self.params[i] for i in agreed.tolist()])
        self._ready_order = None

    def finish_backward(self) -> None:
        # Buckets holding a parameter that got no gradient in this backward are still
        # waiting: send them now (with zeros for the missing gradients).
        for index in range(len(self._launched), len(self.buckets)):
            self._launch(index)
        for pending in self._launched:
            pending.wait()
        self._launched = []
        if self._ready_order is not None and self.params:
            self._rebuild()
        self._ready = [0] * len(self.buckets)


class LocalSGDSync(Sync):
    """Each rank steps alone; every `sync_every` steps the replicas are averaged."""

    def __init__(self, model: nn.Module, sync_every: int) -> None:
        super().__init__(model)
        self.sync_every = sync_every
        self.steps = 0  # optimizer steps taken in the run (also before a resume)
        broadcast_state(model)

    def replica_state(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """What makes up a replica: parameters, floating-point buffers and the optimizer's
        per-parameter tensors (SGD's momentum buffer, Adam's moments). Integer buffers
        (BatchNorm's batch counter) and scalar state (Adam's step) are the same on every rank.
        """
        tensors = [*self.model.parameters()]
        tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        for p in self.model.parameters():
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.is_floating_point() and value.shape == p.shape:
                    tensors.append(value)
        return tensors

    def _average(self, optimizer: torch.optim.Optimizer) -> None:
        communicate(self.replica_state(optimizer), self.all_reduce, average=True)

    def _replicas_equal(self) -> bool:
        """True when the replicas are equal: no step alone since the last average."""
        return self.steps % self.sync_every == 0

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1
        if self._replicas_equal():
            self._average(optimizer)

    @contextmanager
    def consolidated(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The average of the replicas for the block only: each rank then goes back to its
        own replica, so a run that evaluates or saves between two averages trains exactly
        like one that does not."""
        if self._replicas_equal():
            yield
            return
        replicas = self.replica_state(optimizer)
        own = [t.detach().clone() for t in replicas]
        self._average(optimizer)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, mine in zip(replicas, own, strict=True):
                    t.copy_(mine)

    def rank_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if self._replicas_equal():
            return {}  # the replicas equal the checkpoint's model
        return {"replica": [t.detach().cpu().clone() for t in self.replica_state(optimizer)]}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        self.steps = step
        replica = (state or {}).get("replica")
        if replica is None:
            return  # saved right after an average (or by another world size): the model
        tensors = self.replica_state(optimizer)
        if not (
            isinstance(replica, list)
            and len(replica) == len(tensors)
            and all(
                torch.is_tensor(r) and r.shape == t.shape and r.dtype == t.dtype
                for r, t in zip(replica, tensors, strict=True)
            )
        ):
            raise UsageError("the checkpoint's local-sgd replica does not fit this model")
        with torch.no_grad():
            for t, saved in zip(tensors, replica, strict=True):
                t.copy_(saved)


def add_sync_flags(group: argparse._ArgumentGroup) -> None:
    """train_ddp.py's --sync and --sync-every: which strategy of this module is used; with
    --topology (comm/topology.py: which all-reduce allreduce, overlap and local-sgd use) and
    comm/compress.py's --comm-hook, --compress and their settings."""
    group.add_argument(
        "--sync",
        default="ddp",
        choices=SYNC_MODES,
        help="who synchronises gradients: DDP's reducer or one of comm/sync.py",
    )
    group.add_argument(
        "--sync-every",
        type=positive,
        default=None,
        metavar="K",
        help=f"--sync local-sgd only: average the replicas every K optimizer steps "
        f"(unset: {LOCAL_SGD_EVERY})",
    )
    add_topology_flags(group)  # --topology, --inter-node-gbps: comm/topology.py
    add_compress_flags(group)  # --comm-hook, --compress, ...: comm/compress.py


def make_sync(
    mode: str,
    model: nn.Module,
    env: DistEnv,
    *,
    sync_every: int | None = None,
    bucket_bytes: int | None = None,
    all_reduce: CommOp | None = None,
    compression: Compression = NO_COMPRESSION,
) -> Sync:
    """The strategy for `--sync mode`, around `model` (for ddp and torch-zero1, a DDP model or
    a plain one to wrap). `sync_every` is local-sgd's K; `bucket_bytes` caps the gradient
    buckets of ddp, allreduce and overlap (None: each mode's default); `all_reduce` replaces
    dist.all_reduce in allreduce, overlap and local-sgd (None: keep it); `compression` is
    --comm-hook (ddp) or --compress (allreduce), comm/compress.py."""
    if all_reduce is not None and compression.active:
        raise UsageError(
            "--topology and --compress/--comm-hook do not combine: the compressed all-reduces "
            "of comm/compress.py run on the flat world"
        )
    sync = _make_sync(
        mode, model, env, sync_every=sync_every, bucket_bytes=bucket_bytes, compression=compression
    )
    sync.custom_all_reduce = all_reduce
    return sync


def _make_sync(
    mode: str,
    model: nn.Module,
    env: DistEnv,
    *,
    sync_every: int | None,
    bucket_bytes: int | None,
    compression: Compression,
) -> Sync:
    if mode not in SYNC_MODES:
        raise UsageError(f"unknown --sync {mode!r}; choose one of {', '.join(SYNC_MODES)}")
    if sync_every is not None and mode != "local-sgd":
        raise UsageError(f"--sync-every applies to --sync local-sgd only, not --sync {mode}")
    compression.check(mode)
    if mode == "ddp":
        return DDPSync(model, env, bucket_bytes, compression)
    if mode == "allreduce":
        return AllReduceSync(model, bucket_bytes, compression)
    if mode in SHARDED_MODES:
        if bucket_bytes is not None:
            raise UsageError(f"--sync {mode} has no gradient buckets to size")
        from comm import torch_sharded, zero1, zero2, zero3  # they build on this module

        if mode == "torch-zero1":
            return torch_sharded.TorchZero1Sync(model, env)
        sharded = {
            "zero1": zero1.Zero1Sync,
            "zero2": zero2.Zero2Sync,
            "zero3": zero3.Zero3Sync,
            "fsdp2": torch_sharded.FSDP2Sync,
        }
        return sharded[mode](model)
    if mode == "overlap":
        if bucket_bytes is None:
            return OverlapSync(model)
        return OverlapSync(model, bucket_bytes, first_bucket_bytes=bucket_bytes)
    return LocalSGDSync(model, sync_every or LOCAL_SGD_EVERY)
