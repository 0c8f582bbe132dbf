"""Pitfall: DataLoader workers under the spawn start method: the missing
`if __name__ == "__main__":` guard, and datasets that cannot be pickled.

    torchrun --standalone --nproc-per-node 2 pitfalls/dataloader_spawn.py --wrong
    torchrun --standalone --nproc-per-node 2 pitfalls/dataloader_spawn.py --right

With `num_workers > 0` each worker is a separate process. Under spawn (the default on macOS
and Windows) a worker is a fresh interpreter: it receives the dataset pickled, and it imports
the main script to find the classes and functions the pickle names. (forkserver, the default
on Linux from Python 3.14, pickles the dataset too.) Two things break:

- A script without the guard (pitfalls/unguarded_loader.py): the worker's import of the
  script runs its top level again, which starts a loader of its own while the worker is
  still starting up. multiprocessing refuses ("An attempt has been made to start a new
  process before the current process has finished its bootstrapping phase"), the worker
  dies and the parent's loader reports "DataLoader worker ... exited unexpectedly".
- A dataset holding a lambda or a locally defined function (a transform written inline):
  pickle stores functions by name, and a lambda has none it can be found under, so the
  loader fails as it starts its workers ("Can't pickle ... lambda").

The fix: keep everything that runs in the script inside `main()`, called under the guard,
and give transforms a module-level name (a `def`, a class with `__call__`, or
functools.partial of one). The wrong run shows both failures (the first on rank 0 only, in
a subprocess); the right run loads with spawned workers and checks the batches equal those
of a loader without workers.
"""

import functools
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pitfalls import common

UNGUARDED = Path(__file__).resolve().parent / "unguarded_loader.py"


class Transformed(Dataset):
    """A dataset with a per-sample transform, the usual place for a lambda to hide."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.base[i][0])


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


def batches(transform: Callable, workers: int) -> list[torch.Tensor]:
    dataset = Transformed(TensorDataset(torch.arange(8.0)), transform)
    context = "spawn" if workers else None
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, multiprocessing_context=context)
    return list(loader)


def run_unguarded(timeout: float = 120.0) -> dict:
    """Run pitfalls/unguarded_loader.py in a fresh interpreter and say how it ended."""
    proc = subprocess.run(
        [sys.executable, str(UNGUARDED)], capture_output=True, text=True, timeout=timeout
    )
    refused = "bootstrapping phase" in proc.stderr
    return {"unguarded_exit": proc.returncode, "unguarded_bootstrap_error": refused}


def run(right: bool, with_unguarded: bool = True) -> dict:
    """Needs a process group. `with_unguarded=False` leaves out the unguarded-script
    subprocess (the tests run it separately, concurrently)."""
    values: dict = {}
    if right:
        expected = batches(functools.partial(scale, factor=2.0), workers=0)
        got = batches(functools.partial(scale, factor=2.0), workers=1)
        values["batches_match"] = len(got) == len(expected) and all(
            torch.equal(a, b) for a, b in zip(got, expected, strict=True)
        )
        values["outcome"] = "finished"
        return values
    problems = []
    try:
        batches(lambda x: x * 2.0, workers=1)
        values["lambda"] = "loaded"
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        values["lambda"] = type(e).__name__
        problems.append(f"a lambda in the dataset: {str(e).strip().splitlines()[0]}")
    if with_unguarded and dist.get_rank() == 0:
        values.update(run_unguarded())
        if values["unguarded_exit"] != 0:
            why = " (bootstrapping-phase error)" if values["unguarded_bootstrap_error"] else ""
            problems.append(
                f"pitfalls/unguarded_loader.py exited with status {values['unguarded_exit']}{why}"
            )
    if problems:
        values["outcome"] = "error"
        values["message"] = "; ".join(problems)
    return values


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env:
        return common.report(env, "dataloader_spawn", args.right, run(args.right))


if __name__ == "__main__":
    sys.exit(common.cli(main))
