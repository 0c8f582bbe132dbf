"""Command-line flags shared by train_dp.py and train_ddp.py.

Flags that mean the same thing in both scripts are defined here once; each script adds its
own (and gives --batch-size its own meaning: global for DataParallel, per rank for DDP).
Every parse or validation error is one line: `error: ...` and exit status 2.

Parsing imports no torch (this module loads only core/cli.py, core/errors.py and data's
package): a script that parses its flags before `import torch` reports a usage error in a
fraction of a second instead of after the seconds torch takes to load. So the choices of the
flags live here (or in core/cli.py, data/__init__.py), and training/models.py, optim.py and
preempt.py read them from here.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from core.cli import (
    Parser,
    bounded_int,
    non_negative,
    non_negative_float,
    out_dir,
    positive,
    positive_float,
    unit_float,
)
from core.errors import UsageError
from data import DATASETS, TEXT_DATASETS
from parallel.flags import add_sync_flags

if TYPE_CHECKING:
    from core.dist import DistEnv

MODELS = ("mlp", "cnn", "resnet18")  # image classifiers
TEXT_MODELS = ("gpt",)  # language models over bytes, for data/text.py's datasets
# What a factory named by --model package.module:function may ask for, by parameter name.
FACTORY_ARGS = ("in_channels", "image_size", "num_classes")
OPTIMIZERS = ("sgd", "adamw")
# --preempt-signal's choices: the signals a scheduler sends as a warning (SLURM's --signal).
EXTRA_SIGNALS = ("USR1", "USR2", "none")


def model_name(value: str) -> str:
    """--model: one of MODELS or TEXT_MODELS, or `package.module:function` (checked when it
    is built)."""
    module, _, function = value.partition(":")
    if value in MODELS + TEXT_MODELS or (module and function.isidentifier()):
        return value
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(MODELS + TEXT_MODELS)} or package.module:function, "
        f"got {value!r}"
    )


def gpu_list(value: str) -> list[int] | None:
    """train_dp.py's --gpus: None for every visible GPU, [] for none, else the indices in
    order."""
    if value == "all":
        return None
    if value == "none":
        return []
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected all, none or indices such as 0,1, got {value!r}"
        ) from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"indices must be distinct and >= 0, got {value!r}")
    return ids


# --train-size and --eval-size: sample counts a sampler's int64 indices hold with room to
# spare (the synthetic data's memory is checked against the machine: data/datasets.py).
SAMPLES = bounded_int(0, 2**31 - 1, "a sample count")
# DataLoader worker processes per rank: each is a process of its own (hundreds of MB), and a
# typo such as --workers 10000 would start that many per rank.
MAX_WORKERS = 128
# The longest file name a run writes inside --out-dir (checkpoints/.step-00000001.pt.tmp-PID,
# and the like), added to the folder's own length when it is checked.
LONGEST_INSIDE = 64


def run_dir(value: str) -> str:
    """--out-dir: a folder name (core.cli.out_dir) the filesystem can hold with the run's
    files in it: each part at most NAME_MAX bytes, the whole at most PATH_MAX with room for
    the longest name written inside. A longer one would fail at the first write
    (ENAMETOOLONG), after the set-up."""
    value = out_dir(value)
    name_max = _pathconf("PC_NAME_MAX", 255)
    path_max = _pathconf("PC_PATH_MAX", 4096)
    full = os.fsencode(os.path.abspath(value))
    longest = max(full.split(b"/"), key=len)
    if len(longest) > name_max:
        raise argparse.ArgumentTypeError(
            f"a folder name of {len(longest)} bytes; the filesystem allows {name_max}"
        )
    if len(full) + LONGEST_INSIDE > path_max:
        raise argparse.ArgumentTypeError(
            f"a path of {len(full)} bytes; with the run's files inside it must stay under "
            f"{path_max}"
        )
    return value


def _pathconf(name: str, default: int) -> int:
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError, AttributeError):  # not on this platform
        return default


def make_parser(
    description: str, batch_size_help: str, default_batch_size: int, default_out_dir: str
) -> Parser:
    p = Parser(description=description)
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default="synthetic",
        choices=DATASETS,
        help="synthetic needs no files; stdlib is this Python's standard library as bytes "
        "(for --model gpt); the others are read from --data-dir: imagefolder is your own "
        "images, in --data-dir/train/<class>/ and --data-dir/val/<class>/; text is your own "
        "text file or folder of them (for --model gpt; data/text.py)",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder of the dataset (its layout: data/datasets.py, or README's 'Bring your own')",
    )
    d.add_argument(
        "--download",
        action="store_true",
        help="download the dataset into --data-dir first (needs internet)",
    )
    d.add_argument(
        "--trust-data-dir",
        action="store_true",
        help="I trust the files in --data-dir: load CIFAR-10 batch files that are not the "
        "official release (a subset, a re-packed copy) without checking torchvision's MD5 "
        "sums; they are still read by an unpickler that builds arrays only",
    )
    d.add_argument(
        "--augment", action="store_true", help="random crop and flip for cifar10 training images"
    )
    d.add_argument(
        "--train-size",
        type=SAMPLES,
        default=0,
        help="use the first N training samples (0: all; synthetic default 8192; text: N "
        "windows of --context + 1 bytes spread over the split)",
    )
    d.add_argument(
        "--eval-size",
        type=SAMPLES,
        default=0,
        help="use the first N eval samples (0: all; synthetic default 2000; text: N windows "
        "spread over the split)",
    )
    d.add_argument(
        "--workers",
        type=bounded_int(0, MAX_WORKERS, "--workers"),
        default=0,
        help="DataLoader worker processes per rank (0: load in the main process)",
    )

    m = p.add_argument_group("model and optimisation")
    m.add_argument(
        "--model",
        default="cnn",
        type=model_name,
        metavar="{" + ",".join(MODELS + TEXT_MODELS) + "} or MODULE:FUNCTION",
        help="network to train: a built-in one (gpt: a small language model for --dataset "
        "stdlib or text), or your own: package.module:function names a "
        "function returning an nn.Module, imported from the current directory or PYTHONPATH "
        f"and called with those of {', '.join(FACTORY_ARGS)} it takes",
    )
    m.add_argument("--epochs", type=positive, default=3, help="passes over the training set")
    m.add_argument(
        "--max-steps",
        type=non_negative,
        default=0,
        help="stop after N optimizer steps in total (0: no limit)",
    )
    m.add_argument("--batch-size", type=positive, default=default_batch_size, help=batch_size_help)
    m.add_argument(
        "--grad-accum",
        type=positive,
        default=1,
        help="micro-batches per optimizer step (the loss is divided by it)",
    )
    # For the global batch as given, whatever the world size. 0.015 learns the default task
    # at global batches 32 to 128 (1 to 4 ranks x 32), seeds 0-9, in one epoch
    # (benchmarks/learning_check.py). At batch 32, 0.025 already kills enough of the CNN's
    # ReLUs to lose accuracy for some seeds (the 0.05: chance); at 128 (64 steps an
    # epoch) the first epoch's accuracy is about the same from 0.0125 to 0.03.
    m.add_argument(
        "--lr",
        type=positive_float,
        default=0.015,
        help="peak learning rate, for the global batch: used as given, not rescaled with the "
        "world size",
    )
    m.add_argument(
        "--optimizer",
        default="sgd",
        choices=OPTIMIZERS,
        help="sgd (with --momentum) or adamw (with --betas, --eps; decoupled weight decay)",
    )
    # 1 or more makes SGD's velocity grow without bound: the run diverges, whatever --lr.
    m.add_argument("--momentum", type=unit_float, default=0.9, help="SGD momentum, in [0, 1)")
    m.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=0.0,
        help="weight decay (SGD: added to the gradient; AdamW: decoupled)",
    )
    m.add_argument(
        "--betas",
        type=unit_float,
        nargs=2,
        default=[0.9, 0.999],
        metavar=("B1", "B2"),
        help="AdamW's decay rates of the first and second moment estimates",
    )
    m.add_argument("--eps", type=positive_float, default=1e-8, help="AdamW's denominator term")
    m.add_argument(
        "--lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="learning rate after warm-up",
    )
    m.add_argument(
        "--warmup-steps",
        type=non_negative,
        default=0,
        help="linear learning-rate warm-up over the first N steps",
    )
    m.add_argument(
        "--clip-grad-norm",
        type=non_negative_float,
        default=0.0,
        metavar="X",
        help="scale each optimizer step's gradient down to global 2-norm X, once per step, "
        "after the gradient sync and fp16 unscaling; the pre-clip norm is logged (0: off; "
        "--sync local-sgd clips each rank's own gradient: parallel/clip.py)",
    )
    m.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="autocast dtype; fp16 (CUDA only) adds a GradScaler",
    )
    m.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (with --sync ddp: split at DDP's buckets by dynamo's "
        "DDPOptimizer; training/compiled.py, docs/compile.md); the first steps pay the "
        "compilation",
    )
    m.add_argument(
        "--compiled-autograd",
        action="store_true",
        help="with --compile, train_ddp.py --sync ddp: compile backward too, DDP's all-reduces "
        "included (torch's compiled autograd and DDP's Python reducer, instead of "
        "DDPOptimizer's graph per bucket; training/compiled.py, docs/compile.md)",
    )
    m.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="keep only each block's input for backward and recompute the rest of its "
        "activations there: less memory for one more forward per step "
        "(training/models.py, checkpoint_activations)",
    )
    m.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="precision of the parameters and of every computation; float64 is for exact "
        "comparisons (the tests' oracles, docs/dp-vs-ddp.md), not for speed",
    )
    m.add_argument(
        "--seed",
        type=bounded_int(0, 2**32 - 1, "a seed"),  # what NumPy's and every torch generator take
        default=0,
        help="model init, data order, synthetic data (0 to 2**32-1)",
    )

    add_gpt_flags(p)

    r = p.add_argument_group("output and resume")
    r.add_argument(
        "--out-dir",
        type=run_dir,
        default=default_out_dir,
        help="checkpoints/, checkpoint.pt (the newest), summary.json and tb/ go here",
    )
    r.add_argument(
        "--resume",
        default=None,
        help="checkpoint to continue from: a file, or 'auto': the newest in --out-dir if "
        "there is one, else start fresh (the same command for the first start and restarts)",
    )
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out-dir that holds another: delete its checkpoints, "
        "summary.json, tb/, profile/ and timeline* first (without this flag, or --resume, such "
        "an "
        "--out-dir is refused)",
    )
    r.add_argument(
        "--save-every",
        type=non_negative,
        default=0,
        help="also save a checkpoint every N optimizer steps (0: only at the end of each "
        "epoch and of the run; with --fault-tolerance, at a stop and at the run's end)",
    )
    r.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background: copy the step's state to CPU memory, then "
        "train on while a thread writes it (at most one save in flight; docs/checkpoints.md)",
    )
    r.add_argument(
        "--preempt-signal",
        default="USR1",
        choices=EXTRA_SIGNALS,
        help="besides SIGTERM, the signal that stops the run cleanly: every rank finishes its "
        "optimizer step, a checkpoint is saved, every rank exits 0 (SLURM: --signal=USR1@90; "
        "docs/launching.md, 'Preemption')",
    )
    r.add_argument(
        "--keep",
        type=positive,
        default=3,
        help="keep the newest N checkpoints in --out-dir/checkpoints/, delete older ones",
    )
    r.add_argument(
        "--log-every",
        type=positive,
        default=50,
        help="log the running training loss every N optimizer steps",
    )
    r.add_argument("--no-eval", action="store_true", help="skip evaluation after each epoch")

    o = p.add_argument_group("observability")
    o.add_argument(
        "--trace-comm",
        action="store_true",
        help="record every collective's bytes and time (comm/tracer.py): TensorBoard comm/*, "
        "the 'comm' key of summary.json and <out-dir>/timeline/ (python -m study.timeline); "
        "train_ddp.py only: train_dp.py runs no collective",
    )
    o.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler trace of steps 3-5 in <out-dir>/profile/ (chrome://tracing)",
    )
    return p


def add_gpt_flags(p: Parser) -> None:
    """--model gpt's sizes and --sample. The defaults train visibly in a few minutes on two
    CPU processes (README, 'A small GPT on real text')."""
    g = p.add_argument_group("language model (--model gpt; training/gpt.py)")
    add_gpt_size_flags(g)
    g.add_argument(
        "--sample",
        type=non_negative,
        default=0,
        metavar="N",
        help="at the end, global rank 0 prints N bytes the trained model writes (0: none)",
    )
    g.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        help="--sample's softmax temperature, sampled with --seed (0: greedy)",
    )


def add_gpt_size_flags(g: argparse._ArgumentGroup | Parser) -> None:
    """--model gpt's sizes (--context, --gpt-layers, --gpt-width, --gpt-heads), which the
    benchmarks take too (benchmarks/workload.py)."""
    g.add_argument(
        "--context",
        type=bounded_int(1, 2**16, "bytes"),
        default=128,
        help="bytes the model sees at once: a sample is a window of --context + 1 bytes",
    )
    g.add_argument(
        "--gpt-layers", type=bounded_int(1, 1024, "layers"), default=4, help="transformer blocks"
    )
    g.add_argument(
        "--gpt-width",
        type=bounded_int(1, 2**14, "a width"),
        default=128,
        help="embedding width (a multiple of --gpt-heads)",
    )
    g.add_argument(
        "--gpt-heads",
        type=bounded_int(1, 2**14, "heads"),
        default=4,
        help="attention heads per block",
    )


def validate(args: argparse.Namespace, env: DistEnv) -> None:
    """Checks that involve more than one flag, or a flag and the job (single flags are
    checked by their type). First of all, the ranks compare their flags (one collective).
    Called once the job runs, so it may import torch; parsing above must not."""
    from comm.topology import check_topology_flags  # torch: see the module's docstring
    from parallel.factory import check_transport_flags  # torch
    from training.guard import check_same_flags  # torch, and a collective

    check_same_flags(args, env)
    check_fault_tolerance_settings(args)
    cuda = env.device.type == "cuda"
    if args.trace_comm and env.backend == "none":
        raise UsageError(
            "--trace-comm records torch.distributed collectives and train_dp.py runs none "
            "(DataParallel copies between GPUs inside one process); --profile shows its copies"
        )
    if getattr(args, "sync_bn", False) and not cuda:  # train_ddp.py's --sync-bn
        raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU")
    if args.amp == "fp16" and not cuda:
        raise UsageError("--amp fp16 needs CUDA (use --amp bf16 on CPU)")
    if args.amp == "fp16" and getattr(args, "sync", None) in ("local-sgd", "diloco"):
        # train_ddp.py's modes whose ranks step alone between averages: each rank's GradScaler
        # sees only its own gradients, so the ranks skip different steps and scale by
        # different factors, and a checkpoint keeps rank 0's scaler only.
        raise UsageError(
            f"--sync {args.sync} cannot use --amp fp16 (each rank's loss scaler would "
            "skip other steps); use --amp bf16, which needs no scaler"
        )
    if args.amp != "none" and args.dtype != "float32":
        raise UsageError(f"--amp {args.amp} goes with --dtype float32, not {args.dtype}")
    if args.amp != "none" and getattr(args, "param_dtype", None):
        raise UsageError(
            f"--amp {args.amp} and --param-dtype {args.param_dtype} are two ways to compute in "
            "low precision: choose one (--param-dtype for the sharded --sync modes)"
        )
    if args.activation_checkpointing and getattr(args, "sync", None) in ("zero3", "hsdp"):
        raise UsageError(
            f"--activation-checkpointing does not combine with --sync {args.sync}: its forward "
            "hooks free each unit after use, and the recomputation inside backward would free "
            "it again before the unit's backward reads it (use --sync fsdp2 or torch-hsdp)"
        )
    if args.compiled_autograd:
        check_compiled_autograd(args)
    if args.dataset not in ("synthetic", "stdlib") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset} needs --data-dir")
    check_model_data(args)
    if args.download and args.dataset in ("synthetic", "imagefolder", *TEXT_DATASETS):
        raise UsageError(f"--download: there is nothing to download for --dataset {args.dataset}")
    if hasattr(args, "topology"):  # train_ddp.py's --topology, --inter-node-gbps
        check_topology_flags(args.topology, args.inter_node_gbps, args.sync, env.world_size)
        check_transport_flags(args, env)  # --transport shm: parallel/factory.py
    if args.download and args.trust_data_dir:
        raise UsageError(
            "--download fetches the official files and --trust-data-dir is for a copy that is "
            "not: choose one of them"
        )


def check_compiled_autograd(args: argparse.Namespace) -> None:
    """--compiled-autograd against the flags it needs and those it cannot serve."""
    if not args.compile:
        raise UsageError("--compiled-autograd compiles backward: it goes with --compile")
    if getattr(args, "sync", None) != "ddp":
        where = f"--sync {args.sync}" if hasattr(args, "sync") else "train_dp.py"
        raise UsageError(
            f"--compiled-autograd is for train_ddp.py --sync ddp, not {where}: it traces DDP's "
            "Python reducer (the hand-made modes' hooks already run after the compiled backward)"
        )
    if args.comm_hook != "none":
        raise UsageError(
            "--compiled-autograd and --comm-hook do not combine: DDP's Python reducer calls a "
            "hook with one gradient, torch's compression hooks take a bucket"
        )
    if args.find_unused_parameters:
        raise UsageError(
            "--compiled-autograd and --find-unused-parameters do not combine: DDP's Python "
            "reducer skips a parameter with no gradient on this rank, while the ranks that "
            "have one wait for it in their all-reduce"
        )


def add_extension_flags(group: argparse._ArgumentGroup) -> None:
    """train_ddp.py's flags that are this repository's own rather than DDP's, in one call so
    that they cost the pair's diff one line: --stall-timeout (training/heartbeat.py) and
    --sync with its settings, --topology and compression (parallel/factory.py)."""
    group.add_argument(
        "--stall-timeout",
        type=non_negative,
        default=45,
        help="seconds a rank may stay behind the others in the training loop before the job "
        "fails naming it (0: off, only --timeout)",
    )
    add_sync_flags(group)  # --sync, --sync-every, --topology, --comm-hook, --compress, ...
    add_fault_tolerance_flags(group)


def coordinator_address(value: str) -> str:
    """--coordinator: HOST:PORT of `python -m training.quorum`."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


# --fault-tolerance's settings and their defaults (a setting away from its default is one the
# user gave).
FAULT_TOLERANCE_SETTINGS = {
    "coordinator": None,
    "replica_id": 0,
    "quorum_timeout": 120.0,
    "ft_timeout": 10.0,
}


def check_fault_tolerance_settings(args: argparse.Namespace) -> None:
    """--fault-tolerance's settings without it would be ignored: refused, as --sync-every is
    without its modes (with it, training/fault_tolerant.py checks the rest)."""
    if getattr(args, "fault_tolerance", True):  # train_dp.py has none of these flags
        return
    given = [k for k, default in FAULT_TOLERANCE_SETTINGS.items() if getattr(args, k) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(f"{flags}: only with --fault-tolerance (launch/fault_tolerant.sh)")


def add_fault_tolerance_flags(group: argparse._ArgumentGroup) -> None:
    """--fault-tolerance and its settings: training/fault_tolerant.py, docs/fault-tolerance.md."""
    group.add_argument(
        "--fault-tolerance",
        action="store_true",
        help="run as one replica of a job that goes on when replicas die or join: a quorum "
        "from --coordinator before every step, newcomers healed from a live peer "
        "(launch/fault_tolerant.sh; docs/fault-tolerance.md)",
    )
    group.add_argument(
        "--coordinator",
        type=coordinator_address,
        default=FAULT_TOLERANCE_SETTINGS["coordinator"],
        help="--fault-tolerance: HOST:PORT of the coordinator (python -m training.quorum)",
    )
    group.add_argument(
        "--replica-id",
        type=non_negative,
        default=FAULT_TOLERANCE_SETTINGS["replica_id"],
        help="--fault-tolerance: this replica's name in logs and in --out-dir/replica-<id>/",
    )
    group.add_argument(
        "--quorum-timeout",
        type=positive_float,
        default=FAULT_TOLERANCE_SETTINGS["quorum_timeout"],
        help="--fault-tolerance: seconds to wait for a quorum before the replica stops",
    )
    group.add_argument(
        "--ft-timeout",
        type=positive_float,
        default=FAULT_TOLERANCE_SETTINGS["ft_timeout"],
        help="--fault-tolerance: seconds a collective among replicas may wait before its "
        "step is redone without the replicas that did not answer",
    )


MAX_GPT_PARAMS = 2 * 10**9  # 8 GB in float32: refused in one line, not by the allocator


def check_model_data(args: argparse.Namespace) -> None:
    """The language model reads bytes, the built-in image models read images: a pairing
    across the two fails here in one line, not at the first forward. A model factory
    (module:function) may take either."""
    text = args.dataset in TEXT_DATASETS
    if args.model == "gpt" and not text:
        raise UsageError(
            f"--model gpt reads text: use --dataset {' or '.join(TEXT_DATASETS)}, "
            f"not {args.dataset}"
        )
    if text and args.model in MODELS:
        raise UsageError(f"--dataset {args.dataset} is text (bytes): use --model gpt")
    if args.sample and args.model != "gpt":
        raise UsageError("--sample: only --model gpt writes text")
    if args.model != "gpt":
        return
    if args.gpt_width % args.gpt_heads:
        raise UsageError(
            f"--gpt-width {args.gpt_width} is not a multiple of --gpt-heads {args.gpt_heads}"
        )
    # 12 W^2 per block (qkv 3, proj 1, MLP 8), the embeddings: refused before allocation.
    params = 12 * args.gpt_layers * args.gpt_width**2 + (256 + args.context) * args.gpt_width
    if params > MAX_GPT_PARAMS:
        raise UsageError(
            f"--gpt-layers {args.gpt_layers} x --gpt-width {args.gpt_width} is about "
            f"{params / 1e9:.1f} billion parameters; this small GPT stops at "
            f"{MAX_GPT_PARAMS / 1e9:.0f} billion"
        )
