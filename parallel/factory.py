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
from comm.shm import ShmWorld
from comm.topology import add_topology_flags, topology_all_reduce
from core.cli import positive, positive_float, unit_float
from core.dist import DistEnv
from core.errors import UsageError
from parallel.allreduce import AllReduceSync
from parallel.base import Sync
from parallel.compressed import CompressedAllReduceSync, CompressedDDPSync
from parallel.ddp import DDPSync
from parallel.diloco import DILOCO_EVERY, OUTER_DTYPES, DiLoCoSync
from parallel.local_sgd import LOCAL_SGD_EVERY, LocalSGDSync
from parallel.overlap import OverlapSync
from parallel.torch_twins import FSDP2Sync, TorchZero1Sync
from parallel.zero1 import Zero1Sync
from parallel.zero2 import Zero2Sync
from parallel.zero3 import Zero3Sync

# The sharded modes (ZeRO-1/2/3 by hand and their library twins) live in their own pages:
# parallel/zero1.py, parallel/zero2.py, parallel/zero3.py, parallel/torch_twins.py.
SHARDED_MODES = ("zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
SYNC_MODES = ("ddp", "allreduce", "overlap", "local-sgd", "diloco", *SHARDED_MODES)
# --transport: the process group's own all-reduce, or comm/shm.py's (one node, CPU tensors).
TRANSPORTS = ("gloo", "shm")
TRANSPORT_MODES = ("allreduce", "overlap", "local-sgd")


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
        help=f"--sync local-sgd: average the replicas every K optimizer steps (unset: "
        f"{LOCAL_SGD_EVERY}); --sync diloco: take an outer step every K (unset: {DILOCO_EVERY})",
    )
    group.add_argument(
        "--outer-lr",
        type=positive_float,
        default=0.7,
        help="--sync diloco: the outer SGD's learning rate on the averaged pseudo-gradient",
    )
    group.add_argument(
        "--outer-momentum",
        type=unit_float,
        default=0.9,
        help="--sync diloco: the outer SGD's Nesterov momentum (0: plain SGD)",
    )
    group.add_argument(
        "--diloco-fragments",
        type=positive,
        default=1,
        metavar="F",
        help="--sync diloco: streaming DiLoCo, the parameters in F fragments synchronised in "
        "turn (F must divide --sync-every)",
    )
    group.add_argument(
        "--outer-dtype",
        default="same",
        choices=OUTER_DTYPES,
        help="--sync diloco: the dtype of the pseudo-gradients' all-reduce (same: the parameters')",
    )
    group.add_argument(
        "--transport",
        default="gloo",
        choices=TRANSPORTS,
        help="--sync allreduce, overlap or local-sgd: the all-reduce the mode calls: the "
        "process group's (gloo or nccl), or shm, comm/shm.py's through shared memory (every "
        "rank on one node)",
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
    diloco: dict | None = None,
) -> Sync:
    """The strategy for `--sync mode`, around `model` (for ddp and torch-zero1, a DDP model or
    a plain one to wrap). `sync_every` is local-sgd's K; `bucket_bytes` caps the gradient
    buckets of ddp, allreduce and overlap (None: each mode's default); `all_reduce` replaces
    dist.all_reduce in allreduce, overlap and local-sgd (None: keep it); `compression` is
    --comm-hook (ddp) or --compress (allreduce), comm/compress.py."""
    if all_reduce is not None and compression.active:
        raise UsageError(
            "--topology/--transport shm and --compress/--comm-hook do not combine: the "
            "compressed all-reduces of comm/compress.py run on the process group"
        )
    if mode not in SYNC_MODES:
        raise UsageError(f"unknown --sync {mode!r}; choose one of {', '.join(SYNC_MODES)}")
    if sync_every is not None and mode not in ("local-sgd", "diloco"):
        raise UsageError(f"--sync-every applies to --sync local-sgd and diloco, not --sync {mode}")
    if diloco and mode != "diloco":
        raise UsageError(
            f"--outer-lr, --outer-momentum, --diloco-fragments and --outer-dtype "
            f"apply to --sync diloco only, not --sync {mode}"
        )
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
    if mode == "diloco":
        return DiLoCoSync(model, sync_every or DILOCO_EVERY, **(diloco or {}))
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
        all_reduce=transport_all_reduce(args, env),
        compression=Compression.from_args(args),
        diloco=diloco_settings(args),
    )


def diloco_settings(args: argparse.Namespace) -> dict:
    """DiLoCoSync's keyword arguments from the flags that differ from their defaults (an
    empty dict: none given, which any --sync accepts)."""
    given = {
        "outer_lr": (args.outer_lr, 0.7),
        "outer_momentum": (args.outer_momentum, 0.9),
        "fragments": (args.diloco_fragments, 1),
        "outer_dtype": (getattr(torch, args.outer_dtype, None), None),
    }
    if args.sync == "diloco":
        return {k: v for k, (v, _) in given.items()}
    return {k: v for k, (v, default) in given.items() if v != default}


def check_transport_flags(args: argparse.Namespace, env: DistEnv) -> None:
    """--transport against --sync, --topology, compression and the device (training/cli.py's
    validate, before anything is written)."""
    transport = getattr(args, "transport", "gloo")
    if transport == "gloo":
        return
    if args.sync not in TRANSPORT_MODES:
        raise UsageError(
            f"--transport {transport} applies to --sync {', '.join(TRANSPORT_MODES)}, "
            f"not --sync {args.sync}"
        )
    if args.topology is not None:
        raise UsageError("--transport shm and --topology do not combine: choose one all-reduce")
    if env.device.type != "cpu":
        raise UsageError("--transport shm reduces CPU tensors; on GPUs NCCL already does this")


def transport_all_reduce(args: argparse.Namespace, env: DistEnv) -> CommOp | None:
    """The all-reduce the hand-made modes average with: --topology's hierarchical one,
    --transport shm's through shared memory, or None (dist.all_reduce on the process group)."""
    check_transport_flags(args, env)
    if getattr(args, "transport", "gloo") == "shm":
        return ShmWorld().op()
    return topology_all_reduce(args.topology, args.inter_node_gbps)
