"""Convert a sharded checkpoint (training/sharded.py) into the single-file format.

    python -m tools.convert runs/zero/checkpoints/step-00000020.dcp runs/zero/full.pt
    python train_dp.py --resume runs/zero/full.pt ...      # or train_ddp.py --sync ddp

Runs in one process, without a process group: DCP reads every rank's files and puts the
slices together (as torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, but
through training/sharded.py's SafeReader: the folder is untrusted, nothing in it is
unpickled without an allow-list); this module
then cuts the flat vectors of zero1/zero2/zero3/hsdp back into named tensors (the names and
shapes are in the checkpoint's train_state.pt), maps FSDP2's (fsdp2, torch-hsdp) and
ZeroRedundancyOptimizer's per-name optimizer state to the plain optimizer's per-index state,
and writes the file that training/checkpoint/ writes for `--sync ddp`: every sharded mode
takes DDP's steps, so the converted checkpoint continues the same run under `--sync ddp` or
in train_dp.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from core.cli import Parser
from core.errors import UsageError, run_cli
from core.files import writing
from training.checkpoint import CheckpointError, write_checkpoint
from training.sharded import SafeReader, dcp_error, load_sharded_state


def _split(flat: torch.Tensor, shapes: list[list[int]]) -> list[torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [t.reshape(s).clone() for t, s in zip(flat.split(sizes), shapes, strict=True)]


def _per_name(state: dict, full: dict) -> tuple[dict, dict]:
    """(model, optimizer state by parameter name) from the loaded tensors, whatever the mode."""
    names = [name for name, _ in state["layout"]["params"]]
    shapes = dict((name, shape) for name, shape in state["layout"]["params"])
    if "flat" in full:  # zero1, zero2: one flat vector ("all"); zero3: one per unit
        groups = [names] if "all" in full["flat"] else state["layout"]["units"]
        keys = ["all"] if "all" in full["flat"] else [f"unit{i}" for i in range(len(groups))]
        model = dict(full.get("buffers", {}))  # DCP leaves out an empty dict
        optim: dict = {}
        for key, group in zip(keys, groups, strict=True):
            entry = full["flat"][key]
            params = _split(entry["params"], [shapes[n] for n in group])
            for name, value in zip(group, params, strict=True):
                model[name] = value
            for what, value in entry.items():
                if what == "params":
                    continue
                pieces = [value] * len(group) if value.dim() == 0 else None
                pieces = pieces or _split(value, [shapes[n] for n in group])
                for name, piece in zip(group, pieces, strict=True):
                    optim.setdefault(name, {})[what] = piece.clone()
        return model, optim
    optim = full["optim"]
    if "state" in optim:  # fsdp2: get_state_dict's layout
        optim = optim["state"]
    return dict(full["model"]), {name: dict(optim[name]) for name in names if name in optim}


def convert(source: Path, target: Path) -> dict:
    """Write `target`, the single-file checkpoint of the sharded checkpoint `source`."""
    state = load_sharded_state(source)
    reader = SafeReader(source, state["files"])
    reader.read_metadata()  # a refusal here is one line (inside DCP it logs a traceback)
    full: dict = {}  # filled with every tensor the metadata lists (its sizes are checked)
    try:
        _load_state_dict(  # what dcp_to_torch_save calls, with our reader
            full,
            storage_reader=reader,
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    except (Exception, CheckpointException) as e:
        raise dcp_error(e, f"{source}: not loaded") from None
    try:
        model, by_name = _per_name(state, full)
        names = [name for name, _ in state["layout"]["params"]]
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(
            f"{source}: its tensors do not fit the layout its train_state.pt lists "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from None
    group = {**state["param_group"], "params": list(range(len(names)))}
    args = {**state["args"], "sync": "ddp", "converted_from": state["args"].get("sync")}
    single = {
        "model": model,
        "optimizer": {
            "state": {i: by_name[n] for i, n in enumerate(names) if by_name.get(n)},
            "param_groups": [group],
        },
        "scheduler": state["scheduler"],
        "scaler": None,
        "epoch": state["epoch"],
        "step": state["step"],
        "step_in_epoch": state["step_in_epoch"],
        "world_size": state["world_size"],
        "args": args,
        "rng": state["rng"],
        "ranks": state["ranks"],
    }
    with writing(target):
        write_checkpoint(target, single)
    return single


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="a sharded checkpoint folder (step-N.dcp)")
    parser.add_argument("target", type=Path, help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    with writing(args.target):  # a name too long to look up is refused here too
        if args.target.is_dir():
            raise UsageError(f"{args.target}: a directory; name the file to write")
    state = convert(args.source, args.target)  # a CheckpointError is a UsageError: one line
    print(f"wrote {args.target}: step {state['step']}, {len(state['model'])} tensors")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
