"""train_ddp.py's `--sync` flags and their choices, without torch: the script parses its
flags, and reports a usage error, before it imports torch (training/cli.py says why). The
strategies themselves are built by parallel/factory.py."""

from __future__ import annotations

import argparse

from core.cli import positive, positive_float, unit_float

LOCAL_SGD_EVERY = 4  # --sync-every when it is not given (parallel/local_sgd.py)
DILOCO_EVERY = 8  # --sync-every for diloco when it is not given (parallel/diloco.py)
OUTER_DTYPES = ("same", "bfloat16")  # diloco's all-reduce; same: the parameters' dtype
COMPRESSIONS = ("none", "bf16", "fp16", "powersgd")  # comm/compress.py, parallel/compressed.py

# The sharded modes (ZeRO-1/2/3 and HSDP by hand, and their library twins) live in their own
# pages: parallel/zero1.py, zero2.py, zero3.py, hsdp.py, torch_twins.py.
# HSDP shards inside each node of --topology and replicates across nodes: it needs one
# (comm/topology.py's SHARDING_MODES, which cannot import this page, names the same two).
HSDP_MODES = ("hsdp", "torch-hsdp")
SHARDED_MODES = ("zero1", "zero2", "zero3", "torch-zero1", "fsdp2", *HSDP_MODES)
SYNC_MODES = ("ddp", "allreduce", "overlap", "local-sgd", "diloco", *SHARDED_MODES)
DDP_MODES = ("ddp", "torch-zero1")  # train_ddp.py wraps the model in DDP for these
# --transport: the process group's own all-reduce, or comm/shm.py's (one node, CPU tensors).
TRANSPORTS = ("gloo", "shm")
TRANSPORT_MODES = ("allreduce", "overlap", "local-sgd")
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
    group.add_argument(
        "--find-unused-parameters",
        action="store_true",
        help="--sync ddp and torch-zero1 only: DDP's find_unused_parameters=True, for models "
        "where a parameter may get no gradient (a branch skipped by an `if`, a layer frozen "
        "mid-run); costs a graph walk and an all-reduce of a per-parameter map every step. "
        "The other modes always handle such parameters",
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


def add_topology_flags(group: argparse._ArgumentGroup) -> None:
    """train_ddp.py's --topology and --inter-node-gbps."""
    group.add_argument(
        "--topology",
        default=None,
        metavar="NODESxPER_NODE",
        help="--sync allreduce, overlap or local-sgd: pretend the ranks sit on NODES nodes of "
        "PER_NODE ranks and all-reduce hierarchically (comm/topology.py); --sync hsdp and "
        "torch-hsdp (required there): shard inside each node, replicate across nodes",
    )
    group.add_argument(
        "--inter-node-gbps",
        type=float,
        default=None,
        metavar="GBIT_S",
        help="with --topology: emulate an inter-node link of this many Gbit/s by delaying "
        "each collective that crosses nodes by its bytes / speed (not with torch-hsdp)",
    )
