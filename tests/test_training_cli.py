"""The flags parse without torch: training/cli.py (the shared flags), parallel/flags.py
(train_ddp.py's --sync flags), core/cli.py (--backend's choices, the value types) and what they
import load no torch, so a script that parses its flags before `import torch` answers a bad
flag in a fraction of a second (torch takes seconds to import, 11-15 s on a loaded box).
And the checks of flag combinations (training/cli.py validate) that a CPU can reach: the job
is a DistEnv written by hand, here one that computes on a GPU, which nothing below touches."""

from __future__ import annotations

import json

import pytest
import torch

import train_ddp
from core.dist import DistEnv
from core.errors import UsageError
from tests.multiproc import PYTHON, run_cmd
from training.cli import validate

ON_A_GPU = DistEnv(0, 0, 1, 1, "nccl", torch.device("cuda", 0))

# Both scripts' parsers, as train_dp.py and train_ddp.py build them, in a fresh interpreter
# that then reports which of torch's (and numpy's) modules it loaded.
PARSE = """
import json, sys
from core.cli import BACKENDS, bounded_int, non_negative, parse_or_exit
from parallel.flags import add_sync_flags
from training.cli import gpu_list, make_parser

def parsers():
    dp = make_parser("dp", "global batch", 64, "runs/dp")
    dp.add_argument_group("devices").add_argument("--gpus", type=gpu_list, default="all")
    ddp = make_parser("ddp", "per rank", 32, "runs/ddp")
    g = ddp.add_argument_group("distributed")
    g.add_argument("--backend", default=None, choices=BACKENDS)
    g.add_argument("--timeout", type=bounded_int(1, 10**7, "seconds"), default=600)
    g.add_argument("--stall-timeout", type=non_negative, default=45)
    add_sync_flags(g)
    return dp, ddp

dp, ddp = parsers()
args = [dp.parse_args(["--gpus", "0,1", "--model", "my:net"]),
        ddp.parse_args(["--sync", "zero2", "--backend", "gloo", "--topology", "2x2"])]
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "torchvision"})
print(json.dumps([args[0].gpus, args[0].model, args[1].sync, args[1].topology, loaded]))
sys.stdout.flush()
parse_or_exit(ddp.parse_args, sys.argv[1:])  # a bad flag: one line, exit 2
"""


def test_both_scripts_flags_parse_without_torch():
    done = run_cmd([PYTHON, "-c", PARSE, "--sync", "zero4"], timeout=60)
    gpus, model, sync, topology, loaded = json.loads(done.stdout)
    assert (gpus, model, sync, topology) == ([0, 1], "my:net", "zero2", "2x2")
    assert loaded == [], f"parsing imported {loaded}"
    assert done.returncode == 2
    assert done.stderr.startswith("error: argument --sync: invalid choice: 'zero4'"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_a_script_module_that_needs_torch_still_gets_the_flags_choices():
    """The choices moved out of the modules that use them are the same objects there."""
    from data.datasets import DATASETS as used_by_datasets
    from training import cli, models
    from training.devices import gpu_list

    assert models.MODELS is cli.MODELS and gpu_list is cli.gpu_list
    assert used_by_datasets == (
        "synthetic",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "imagefolder",
        "stdlib",
        "text",
    )


def test_local_sgd_and_diloco_refuse_fp16_autocast_and_other_modes_take_it():
    """Per-rank loss scalers would skip different steps between the averages."""
    validate(train_ddp.parse_args(["--sync", "allreduce", "--amp", "fp16"]), ON_A_GPU)
    validate(train_ddp.parse_args(["--sync", "local-sgd", "--amp", "bf16"]), ON_A_GPU)
    for mode in ("local-sgd", "diloco"):
        args = train_ddp.parse_args(["--sync", mode, "--amp", "fp16"])
        with pytest.raises(UsageError, match=f"--sync {mode} cannot use --amp fp16"):
            validate(args, ON_A_GPU)


def test_hsdp_needs_a_topology_and_its_hooks_refuse_activation_checkpointing():
    """--sync hsdp and torch-hsdp shard by --topology: without one, one line; hsdp frees its
    units in forward hooks as zero3 does, so recomputation in backward is refused alike."""
    cpu = DistEnv(0, 0, 4, 4, "gloo", torch.device("cpu"))
    for mode in ("hsdp", "torch-hsdp"):
        with pytest.raises(UsageError, match=f"--sync {mode} needs --topology NODESxPER_NODE"):
            validate(train_ddp.parse_args(["--sync", mode]), cpu)
        validate(train_ddp.parse_args(["--sync", mode, "--topology", "2x2"]), cpu)
    args = ["--sync", "hsdp", "--topology", "2x2", "--activation-checkpointing"]
    with pytest.raises(UsageError, match="--activation-checkpointing does not combine with"):
        validate(train_ddp.parse_args(args), cpu)


def test_fault_tolerance_settings_without_it_are_refused():
    """--coordinator, --replica-id, --quorum-timeout and --ft-timeout set up a replica: given
    to a plain train_ddp.py run they would be ignored, so the run is refused in one line."""
    cpu = DistEnv(0, 0, 2, 2, "gloo", torch.device("cpu"))
    validate(train_ddp.parse_args([]), cpu)  # the defaults pass
    for argv, flags in [
        (["--coordinator", "127.0.0.1:29400"], "--coordinator"),
        (["--replica-id", "2", "--ft-timeout", "3"], "--replica-id, --ft-timeout"),
        (["--quorum-timeout", "5"], "--quorum-timeout"),
    ]:
        with pytest.raises(UsageError, match=f"^{flags}: only with --fault-tolerance"):
            validate(train_ddp.parse_args(argv), cpu)
