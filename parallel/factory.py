"""The `--sync` factory: which strategy of parallel/ synchronises train_ddp.py's gradients.
Its flags are parallel/flags.py's (no torch there: they are parsed before torch loads)."""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from comm.communicate import (
    CommOp,
)
from comm.compress import NO_COMPRESSION, Compression
from comm.shm import ShmWorld
from comm.topology import build_topology, check_layout, check_topology_flags, topology_all_reduce
from core.dist import DistEnv
from core.errors import UsageError
from parallel.allreduce import AllReduceSync
from parallel.base import Sync
from parallel.compressed import CompressedAllReduceSync, CompressedDDPSync
from parallel.ddp import DDPSync, choose_reducer
from parallel.diloco import DiLoCoSync
from parallel.flags import (
    DDP_MODES,
    DILOCO_EVERY,
    HSDP_MODES,
    LOCAL_SGD_EVERY,
    MIXED_PRECISION_MODES,
    SHARDED_MODES,
    SYNC_MODES,
    TRANSPORT_MODES,
)
from parallel.flags import add_sync_flags as add_sync_flags  # train_ddp.py imports it from here
from parallel.hsdp import HSDPSync
from parallel.local_sgd import LocalSGDSync
from parallel.overlap import OverlapSync
from parallel.torch_twins import FSDP2Sync, TorchZero1Sync
from parallel.zero1 import FULL, Precision, Zero1Sync
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
    diloco: dict | None = None,
    find_unused_parameters: bool = False,
    precision: Precision = FULL,
    topology: str | None = None,
    inter_node_gbps: float | None = None,
) -> Sync:
    """The strategy for `--sync mode`, around `model` (for ddp and torch-zero1, a DDP model or
    a plain one to wrap). `sync_every` is local-sgd's K; `bucket_bytes` caps the gradient
    buckets of ddp, allreduce and overlap (None: each mode's default); `all_reduce` replaces
    dist.all_reduce in allreduce, overlap and local-sgd (None: keep it); `compression` is
    --comm-hook (ddp) or --compress (allreduce), comm/compress.py; `find_unused_parameters`
    is DDP's option (ddp, torch-zero1: a model to wrap is wrapped with it); `precision` is
    --param-dtype and --reduce-dtype (MIXED_PRECISION_MODES); `topology` ('NODESxPER_NODE')
    and `inter_node_gbps` are --topology's layout for hsdp and torch-hsdp, which shard by it
    (the all-reduce modes take --topology as their `all_reduce`)."""
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
    if find_unused_parameters and mode not in DDP_MODES:
        raise UsageError(
            f"--find-unused-parameters is DDP's option (--sync ddp, torch-zero1); --sync {mode} "
            "always leaves a parameter that no rank gave a gradient unstepped"
        )
    if topology is not None and mode not in HSDP_MODES:
        raise UsageError(f"make_sync: a layout to shard by is for --sync hsdp, not --sync {mode}")
    if mode in HSDP_MODES:  # the checks of train_ddp.py's --topology, also for direct callers
        check_topology_flags(topology, inter_node_gbps, mode, env.world_size)
    compression.check(mode)
    unused = {"find_unused_parameters": find_unused_parameters}
    if precision != FULL and mode not in MIXED_PRECISION_MODES:
        raise UsageError(
            f"--param-dtype and --reduce-dtype apply to --sync {', '.join(MIXED_PRECISION_MODES)}"
            f", not --sync {mode} (for the others: --amp)"
        )
    if mode == "ddp" and compression.active:
        return CompressedDDPSync(model, env, compression, bucket_bytes, **unused)
    if mode == "ddp":
        return DDPSync(model, env, bucket_bytes, **unused)
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
        return TorchZero1Sync(model, env, **unused)
    if mode == "hsdp":
        return HSDPSync(model, build_topology(topology, inter_node_gbps))
    if mode == "torch-hsdp":
        nodes, per_node = check_layout(topology, None, env.world_size)
        return FSDP2Sync(model, layout=(nodes, per_node))
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
        all_reduce=transport_all_reduce(args, env),
        compression=Compression.from_args(args),
        diloco=diloco_settings(args),
        find_unused_parameters=args.find_unused_parameters,
        precision=precision_from_args(args),
        **hsdp_layout(args),
    )


def hsdp_layout(args: argparse.Namespace) -> dict:
    """--topology and --inter-node-gbps for make_sync, under --sync hsdp and torch-hsdp."""
    if args.sync not in HSDP_MODES:
        return {}
    return {"topology": args.topology, "inter_node_gbps": args.inter_node_gbps}


def ddp_kwargs(args: argparse.Namespace) -> dict:
    """DDP's options that train_ddp.py's flags set, for `DDP(model, ..., **ddp_kwargs(args))`
    (--sync ddp and torch-zero1): --find-unused-parameters, and --compiled-autograd's Python
    reducer, which DDP's constructor reads from torch's config: set here, on the line that
    builds DDP (parallel/ddp.py's choose_reducer)."""
    choose_reducer(getattr(args, "compiled_autograd", False))
    return {"find_unused_parameters": True} if args.find_unused_parameters else {}


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
    if args.sync in HSDP_MODES:  # --topology is their sharding (make_sync's `topology`)
        return None
    if getattr(args, "transport", "gloo") == "shm":
        return ShmWorld().op()
    return topology_all_reduce(args.topology, args.inter_node_gbps)
