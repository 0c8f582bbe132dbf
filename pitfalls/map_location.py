"""Pitfall: `torch.load` without `map_location`, so tensors go back where they were saved.

    torchrun --standalone --nproc-per-node 2 pitfalls/map_location.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/map_location.py --right

torch.save records, for every tensor, the device it lived on ("cuda:0" for rank 0 of a GPU
job), and torch.load puts it back on exactly that device unless `map_location` says
otherwise. So when every rank loads rank 0's checkpoint, every rank's copy lands on cuda:0:
GPU 0 runs out of memory, or the model ends up on the wrong device. And on a machine without
a GPU the same file does not load at all. The fix: `map_location` naming this rank's device
(or "cpu"; `load_state_dict` then copies into the model wherever it lives).

What runs where:
- With one GPU per rank, rank 0 saves from cuda:0 and the wrong run shows every rank's
  tensors on cuda:0; the right run shows each on its own GPU.
- On CPU there is no second device to land on, so the script writes the file a GPU job would
  write: its tensors are recorded as "cuda:0" (by a torch.serialization tagger that is active
  only while this file is saved). The wrong run then fails exactly as loading a GPU
  checkpoint on a CPU-only machine does; the right run loads it onto this rank's CPU.
Either way the RESULT line shows the device each rank's tensors were recorded on and where
they landed.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
import torch.serialization

from core.dist import DistEnv
from pitfalls import common

_recorded_location: str | None = None


def _tag(storage) -> str | None:
    return _recorded_location  # None: let torch's own taggers say where the storage is


def _restore(storage, location: str) -> None:
    return None  # never claims a storage: torch's own deserializers handle every location


torch.serialization.register_package(0, _tag, _restore)


@contextmanager
def recorded_as(location: str) -> Iterator[None]:
    """While active, torch.save records every tensor as living on `location`."""
    global _recorded_location
    _recorded_location = location
    try:
        yield
    finally:
        _recorded_location = None


def save_like_rank0_of_a_gpu_job(path: Path, env: DistEnv) -> None:
    torch.manual_seed(0)
    state = {"weight": torch.randn(4, 4), "bias": torch.zeros(4)}
    if env.device.type == "cuda":
        torch.save({k: v.to(env.device) for k, v in state.items()}, path)  # rank 0: cuda:0
    else:
        with recorded_as("cuda:0"):
            torch.save(state, path)


def run(right: bool, env: DistEnv, directory: Path) -> dict:
    """Rank 0 saves, every rank loads. Needs a process group."""
    path = Path(directory) / "checkpoint.pt"
    if env.is_main:
        save_like_rank0_of_a_gpu_job(path, env)
    dist.barrier()
    recorded: list[str] = []

    def note(storage, location):  # a map_location function sees each recorded device
        recorded.append(location)
        return storage

    torch.load(path, map_location=note, weights_only=True)
    try:
        if right:
            state = torch.load(path, map_location=env.device, weights_only=True)
        else:
            state = torch.load(path, weights_only=True)
        landed = str(state["weight"].device)
        error = None
    except RuntimeError as e:
        landed = "error"
        error = str(e).strip().splitlines()[0]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (str(env.device), landed, error))
    values: dict = {
        "recorded": sorted(set(recorded)),
        "rank_devices": [own for own, _, _ in everyone],
        "loaded_on": [where for _, where, _ in everyone],
    }
    if error:
        values["outcome"] = "error"
        values["message"] = f"rank {env.rank}: {error}"
    elif any(where != own for own, where, _ in everyone):
        values["outcome"] = "wrong_device"
        values["message"] = "every rank's tensors landed where rank 0 saved them"
    else:
        values["outcome"] = "own_device"
    return values


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with (
        common.world(args, backend=None) as env,
        tempfile.TemporaryDirectory(prefix="pitfall-") as tmp,
    ):
        name = [tmp]  # rank 0's directory, for every rank (one machine)
        dist.broadcast_object_list(name, src=0)
        values = run(args.right, env, Path(name[0]))
        dist.barrier()  # nobody is still reading when rank 0 removes the directory
        return common.report(env, "map_location", args.right, values)


if __name__ == "__main__":
    sys.exit(common.cli(main))
