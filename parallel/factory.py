"""The `--sync` factory: which strategy of parallel/ synchronises train_ddp.py's gradients.
Its flags are parallel/flags.py's (no torch there: they are parsed before torch loads)."""

from __future__ import annotations

import argparse

import torch.nn as nn

from comm.communicate import (
    CommOp,
)
from comm.compress import NO_COMPRESSION, Compression
from comm.topology import topology_all_reduce
from core.dist import DistEnv
from core.errors import UsageError
from parallel.allreduce import AllReduceSync
from parallel.base import Sync
from parallel.compressed import CompressedAllReduceSync, CompressedDDPSync
from parallel.ddp import DDPSync
from parallel.flags import LOCAL_SGD_EVERY, SHARDED_MODES, SYNC_MODES
from parallel.flags import add_sync_flags as add_sync_flags  # train_ddp.py imports it from here
from parallel.local_sgd import LocalSGDSync
from parallel.overlap import OverlapSync
from parallel.torch_twins import FSDP2Sync, TorchZero1Sync
from parallel.zero1 import Zero1Sync
from parallel.zero2 import Zero2Sync
from parallel.zero3 import Zero3Sync


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
    if mode not in SYNC_MODES:
        raise UsageError(f"unknown --sync {mode!r}; choose one of {', '.join(SYNC_MODES)}")
    if sync_every is not None and mode != "local-sgd":
        raise UsageError(f"--sync-every applies to --sync local-sgd only, not --sync {mode}")
    if bucket_bytes is not None and mode in SHARDED_MODES:
        raise UsageError(f"--sync {mode} has no gradient buckets to size")
    compression.check(mode)
    if mode == "ddp" and compression.active:
        return CompressedDDPSync(model, env, compression)
    if mode == "ddp":
        return DDPSync(model, env, bucket_bytes)
    if mode == "allreduce" and compression.active:
        return CompressedAllReduceSync(model, compression)
    if mode == "allreduce":
        return AllReduceSync(model, bucket_bytes, all_reduce=all_reduce)
    if mode == "overlap":
        buckets = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
        first = {} if bucket_bytes is None else {"first_bucket_bytes": bucket_bytes}
        return OverlapSync(model, **buckets, **first, all_reduce=all_reduce)
    if mode == "local-sgd":
        return LocalSGDSync(model, sync_every or LOCAL_SGD_EVERY, all_reduce=all_reduce)
    if mode == "torch-zero1":
        return TorchZero1Sync(model, env)
    sharded = {"zero1": Zero1Sync, "zero2": Zero2Sync, "zero3": Zero3Sync, "fsdp2": FSDP2Sync}
    return sharded[mode](model)


def sync_from_args(
    args: argparse.Namespace, model: nn.Module, env: DistEnv, bucket_bytes: int | None = None
) -> Sync:
    """`make_sync` for train_ddp.py's flags: --sync, --sync-every, --topology's all-reduce
    (comm/topology.py) and --comm-hook/--compress (comm/compress.py). `bucket_bytes`: the
    gradient buckets' cap (tests and benchmarks; None: each mode's default)."""
    return make_sync(
        args.sync,
        model,
        env,
        sync_every=args.sync_every,
        bucket_bytes=bucket_bytes,
        all_reduce=topology_all_reduce(args.topology, args.inter_node_gbps),
        compression=Compression.from_args(args),
    )
