"""The `--sync` factory: which strategy of parallel/ synchronises train_ddp.py's gradients,
and its flags."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from comm.communicate import (
    CommOp,
)
from comm.compress import COMPRESSIONS, NO_COMPRESSION, Compression
from comm.topology import add_topology_flags, topology_all_reduce
from core.cli import positive
from core.dist import DistEnv
from core.errors import UsageError
from parallel.allreduce import AllReduceSync
from parallel.base import Sync
from parallel.compressed import CompressedAllReduceSync, CompressedDDPSync
from parallel.ddp import DDPSync
from parallel.local_sgd import LOCAL_SGD_EVERY, LocalSGDSync
from parallel.overlap import OverlapSync
from parallel.torch_twins import FSDP2Sync, TorchZero1Sync
from parallel.zero1 import FULL, Precision, Zero1Sync
from parallel.zero2 import Zero2Sync
from parallel.zero3 import Zero3Sync

# The sharded modes (ZeRO-1/2/3 by hand and their library twins) live in their own pages:
# parallel/zero1.py, parallel/zero2.py, parallel/zero3.py, parallel/torch_twins.py.
SHARDED_MODES = ("zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
SYNC_MODES = ("ddp", "allreduce", "overlap", "local-sgd", *SHARDED_MODES)
# The modes with mixed precision: float32 masters, low-precision compute copies and collectives.
MIXED_PRECISION_MODES = ("zero1", "zero2", "zero3", "fsdp2")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
REDUCE_DTYPES = ("float32", "bfloat16")


def add_compress_flags(group: argparse._ArgumentGroup) -> None:
    """train_ddp.py's --comm-hook, --compress, --powersgd-rank and --error-feedback."""
    group.add_argument(
        "--comm-hook",
        default="none",
        choices=COMPRESSIONS,
        help="--sync ddp only: torch's DDP communication hook (fp16/bf16: cast the buckets; "
        "powersgd: low-rank gradients, see docs/compression.md)",
    )
    group.add_argument(
        "--compress",
        default="none",
        choices=COMPRESSIONS,
        help="--sync allreduce only: the hand-made twins of --comm-hook (comm/compress.py)",
    )
    group.add_argument(
        "--powersgd-rank",
        type=positive,
        default=None,
        metavar="R",
        help="rank of PowerSGD's factors (unset: 1); min(R, rows, columns) per matrix",
    )
    group.add_argument(
        "--error-feedback",
        dest="error_feedback",
        action="store_true",
        default=None,
        help="carry what compression left out into the next step (the default for powersgd "
        "and --compress; torch's fp16/bf16 hooks have none)",
    )
    group.add_argument(
        "--no-error-feedback",
        dest="error_feedback",
        action="store_false",
        help="drop what compression left out (by default it is kept, see --error-feedback)",
    )


def add_sync_flags(group: argparse._ArgumentGroup) -> None:
    """train_ddp.py's --sync and --sync-every: which strategy of this module is used; with
    --topology (comm/topology.py: which all-reduce allreduce, overlap and local-sgd use) and
    comm/compress.py's --comm-hook, --compress and their settings."""
    group.add_argument(
        "--sync",
        default="ddp",
        choices=SYNC_MODES,
        help="who synchronises gradients: DDP's reducer or one of parallel/",
    )
    group.add_argument(
        "--sync-every",
        type=positive,
        default=None,
        metavar="K",
        help=f"--sync local-sgd only: average the replicas every K optimizer steps "
        f"(unset: {LOCAL_SGD_EVERY})",
    )
    group.add_argument(
        "--param-dtype",
        default=None,
        choices=PARAM_DTYPES,
        help=f"--sync {'/'.join(MIXED_PRECISION_MODES)} only: forward and backward compute with "
        "copies of the parameters in this dtype, while the optimizer steps the --dtype masters "
        "(unset: the masters' dtype; parallel/zero1.py)",
    )
    group.add_argument(
        "--reduce-dtype",
        default=None,
        choices=REDUCE_DTYPES,
        help="the dtype the gradients cross the network in, with --param-dtype's modes "
        "(unset: --param-dtype's)",
    )
    add_topology_flags(group)  # --topology, --inter-node-gbps: comm/topology.py
    add_compress_flags(group)  # --comm-hook, --compress, ...: parallel/compressed.py


def make_sync(
    mode: str,
    model: nn.Module,
    env: DistEnv,
    *,
    sync_every: int | None = None,
    bucket_bytes: int | None = None,
    all_reduce: CommOp | None = None,
    compression: Compression = NO_COMPRESSION,
    precision: Precision = FULL,
) -> Sync:
    """The strategy for `--sync mode`, around `model` (for ddp and torch-zero1, a DDP model or
    a plain one to wrap). `sync_every` is local-sgd's K; `bucket_bytes` caps the gradient
    buckets of ddp, allreduce and overlap (None: each mode's default); `all_reduce` replaces
    dist.all_reduce in allreduce, overlap and local-sgd (None: keep it); `compression` is
    --comm-hook (ddp) or --compress (allreduce), comm/compress.py; `precision` is
    --param-dtype and --reduce-dtype (MIXED_PRECISION_MODES)."""
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
    if precision != FULL and mode not in MIXED_PRECISION_MODES:
        raise UsageError(
            f"--param-dtype and --reduce-dtype apply to --sync {', '.join(MIXED_PRECISION_MODES)}"
            f", not --sync {mode} (for the others: --amp)"
        )
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
    return sharded[mode](model, precision)


def precision_from_args(args: argparse.Namespace) -> Precision:
    """--param-dtype and --reduce-dtype (unset: None, the masters' dtype)."""

    def dtype(name: str | None) -> torch.dtype | None:
        return getattr(torch, name) if name else None

    return Precision(
        dtype(getattr(args, "param_dtype", None)), dtype(getattr(args, "reduce_dtype", None))
    )


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
        precision=precision_from_args(args),
    )
