"""Run one entry point in this process (one rank of a torchrun job) and report which native
threads are still alive after it: a probe for tests/test_core_exit.py.

    torchrun --standalone --nproc-per-node 2 tests/exit_probe.py train_ddp --epochs 1

runs `run_cli(train_ddp.main, ["--epochs", "1"])`, exactly as the script's own entry point
would, then rank 0 prints `EXIT-CHECK {"status": ..., "threads": [...]}` with the names of
this process's threads (Linux: /proc/self/task/*/comm). An atexit handler prints `TEARDOWN`
when the interpreter's normal teardown runs, so a test can tell whether the process ended
through it. (One entry point per process: a second process group in the same torchrun
worker would find the first one's addresses in the rendezvous store.)
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from core.errors import run_cli  # noqa: E402


def thread_names() -> list[str]:
    return sorted((t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir())


def main(module: str, args: list[str]) -> None:
    rank0 = os.environ.get("RANK", "0") == "0"
    atexit.register(lambda: print("TEARDOWN", flush=True) if rank0 else None)
    status = run_cli(importlib.import_module(module).main, args)
    if rank0:
        print("EXIT-CHECK " + json.dumps({"status": status, "threads": thread_names()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
