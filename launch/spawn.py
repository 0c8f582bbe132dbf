"""Start train_ddp.py's ranks with torch.multiprocessing.spawn instead of torchrun.

For when a launcher is not an option: an IDE's run button, a debugger, a job system that
starts exactly one process. One node only.

    python launch/spawn.py --nproc 2 -- --epochs 1        # 2 CPU ranks (gloo)
    python launch/spawn.py -- --epochs 10                 # one rank per GPU (nccl)

Everything after `--` goes to train_ddp.py. What torchrun would have done is done here by
hand: each child gets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE, and the ranks meet
through a FileStore in a temporary directory (no port to pick, none to collide). The child
creates the process group and calls train_ddp.main(argv), which uses the group it finds.
torchrun adds what this leaves out: several nodes, restarts, per-rank log files and the
failure summary built from @record's error files.

Two pitfalls come with spawning processes yourself:

1. The `if __name__ == "__main__":` guard at the bottom is required. The spawn start method
   runs every child as a fresh interpreter that imports this file (as `__mp_main__`) to find
   `worker`. Whatever the module does at import time happens again in every child; without
   the guard each child would spawn children of its own, and Python stops with "An attempt
   has been made to start a new process before the current process has finished its
   bootstrapping phase". For the same reason `worker` is a module-level function: spawn
   sends it to the children by name, so a lambda or a nested function cannot be spawned.

2. DataLoader workers (`--workers N`) are processes started by each rank, so the machine
   runs nproc x (1 + N) processes; OMP_NUM_THREADS below only divides the cores among the
   ranks. The ranks may start children because mp.spawn makes them non-daemonic (the
   workers of a multiprocessing.Pool are daemonic, and a DataLoader with workers fails in
   them with "daemonic processes are not allowed to have children"). Where the workers
   themselves are spawned (macOS and Windows), they import the main module again, which is
   pitfall 1 once more, and the dataset must be picklable.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from datetime import timedelta
from functools import partial
from pathlib import Path

# `python launch/spawn.py` puts launch/ on sys.path; train_ddp and its packages live one up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train_ddp  # noqa: E402
from core.cli import Parser, positive  # noqa: E402
from core.dist import resolve, usable_cores  # noqa: E402
from core.errors import exit_on_error, run_cli


def worker(local_rank: int, nproc: int, store_path: str, train_argv: list[str]) -> None:
    """One rank, in its own process: torchrun's environment, then train_ddp.main."""
    # tqdm's default lock is a multiprocessing semaphore. When one rank exits with an error
    # (a refused --out-dir), mp.spawn SIGTERMs the others, which cannot release theirs, and
    # the resource tracker adds a "leaked semaphore" warning to the one error line. Only
    # rank 0 draws a bar: a thread lock is all it needs.
    tqdm.set_lock(threading.RLock())
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    code = run_cli(partial(_train, store_path), train_argv)  # rank 0 prints a usage error
    if code:
        sys.exit(code)


def _train(store_path: str, argv: list[str]) -> None:
    args = train_ddp.parse_args(argv)
    env = resolve(args.backend)  # backend and device exactly as train_ddp.py picks them
    kwargs = {}
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)  # before the group exists, as core/dist.py does
        kwargs["device_id"] = env.device
    dist.init_process_group(
        env.backend,
        store=dist.FileStore(store_path, env.world_size),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=args.timeout),
        **kwargs,
    )
    with exit_on_error(env):  # an error leaves the group alone, as core/dist.py explains
        train_ddp.main(argv)
    dist.destroy_process_group()  # a clean exit: every rank gets here


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__)
    parser.add_argument(
        "--nproc",
        type=positive,
        default=None,
        help="ranks to start (default: one per visible GPU, 2 without GPUs)",
    )
    parser.add_argument(
        "train_args", nargs="*", help="arguments for train_ddp.py, after a `--` separator"
    )
    args = parser.parse_args(argv)
    train_ddp.parse_args(args.train_args)  # bad flags: one error line here, before any spawn
    nproc = args.nproc or torch.cuda.device_count() or 2

    # The children import torch afresh and read this; N ranks share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    with tempfile.TemporaryDirectory(prefix="spawn-store-") as tmp:
        try:
            mp.spawn(
                worker,
                args=(nproc, os.path.join(tmp, "store"), args.train_args),
                nprocs=nproc,
                join=True,
            )
        except mp.ProcessExitedException as e:
            # mp.spawn has already terminated the other ranks. A rank that exited with a
            # status of its own has said why (a usage error, printed by rank 0): pass the
            # status on. A rank killed by a signal, or one that raised, is reported as is.
            if e.exit_code is None or e.exit_code <= 0:
                raise
            raise SystemExit(e.exit_code) from None


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
