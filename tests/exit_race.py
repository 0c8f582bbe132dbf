"""An error while a collective's Python callback is still pending: the case that aborts a
process whose interpreter shuts down beside a live process group. For tests/test_core_exit.py.

Rank 0 starts an all-reduce with a Python callback (`Future.then`) and fails at once with a
usage error; rank 1 joins the all-reduce a moment later, so the gloo thread of rank 0
completes the future, and runs or releases the Python callback, while rank 0 is on its way
out. Through the interpreter's teardown that thread asks for the GIL while Python shuts down
and is ended mid-C++ (pthread_exit inside noexcept code: "terminate called without an active
exception", SIGABRT), or runs against a half-finalized interpreter (SIGSEGV): rank 0 dies by
a signal. Through `run_cli`, which ends the process with os._exit once a group has been left
alive, rank 0 exits 2 with one error line.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from core.dist import distributed
from core.errors import UsageError


def main(argv: list[str] | None = None) -> None:
    with distributed("gloo") as env:
        t = torch.ones(1 << 16)
        if env.rank == 0:
            future = dist.all_reduce(t, async_op=True).get_future()
            future.then(lambda f: f.value())  # run by the gloo thread when the peer arrives
            raise UsageError("rank 0 stops while its all-reduce is in flight")
        time.sleep(1.0)  # rank 0 is shutting down by now
        dist.all_reduce(t)
        time.sleep(1.0)  # let rank 0's gloo thread finish its side
        raise UsageError("rank 1 stops too")
