"""Process-group setup shared by every entry point.

torchrun starts one process per rank and tells each one who it is through the environment:
RANK (global), LOCAL_RANK (index on this node, used to pick the GPU), WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the rendezvous store). `distributed()` reads
that, picks the backend and the device, creates the process group with an explicit timeout
and destroys it when the block ends cleanly (not after an error: see `exit_on_error`).
train_ddp.py spells the same steps out in its main(), with `resolve`, `rendezvous` and
`exit_on_error` from here.

Run without torchrun (plain `python train_ddp.py`), the same code becomes a world of one with
an in-memory store, so every script works on a laptop without a launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported here, before any process group exists, on purpose. torch.distributed.nn.functional
# evaluates `group.WORLD` in the default arguments of its ten collectives when it is first
# imported. DDP's constructor imports torch._dynamo, which imports that module; if that first
# import happens *after* init_process_group, the ten defaults keep a reference to the default
# group for the life of the process. destroy_process_group() then cannot free the group, its
# gloo threads (pt_gloo_runloop, gloo_tcp_loop) are still running while the interpreter
# shuts down, and the process can die at exit with "terminate called without an active
# exception" (SIGABRT) after it has done all its work. Imported first, the defaults are None.
# tests/test_exit.py checks that no backend thread outlives a clean exit.
import torch.distributed.nn.functional  # noqa: F401

DEFAULT_TIMEOUT = timedelta(minutes=10)
BACKENDS = ("nccl", "gloo")

# True once `exit_on_error` has left a group alive after an error (see there): from then on
# the process must end without the interpreter's teardown (see `run_cli`).
_group_left_alive = False


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with a non-zero exit."""


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job, and where it computes."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes files and logs. Never LOCAL_RANK 0,
        which exists once per node."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def default_backend() -> str:
    """NCCL drives GPUs; gloo runs collectives on CPU tensors (the CPU simulation uses it)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve(backend: str | None = None) -> DistEnv:
    """Read torchrun's environment (a world of one without it) and pick backend and device.

    If a process group already exists (a test harness, launch/spawn.py or a notebook made
    one), rank, world size and, unless `backend` says otherwise, the backend are the group's.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        backend = backend or dist.get_backend()
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UsageError("backend nccl needs CUDA GPUs; use --backend gloo on CPU")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible: start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, local_world_size, backend, device)


def rendezvous(env: DistEnv) -> dict:
    """How `init_process_group` finds its peers: under torchrun nothing to add (env://,
    MASTER_ADDR and MASTER_PORT); with no launcher, a world of one needs no network at all
    and gets an in-memory store."""
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        return {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    return {}


@contextmanager
def exit_on_error(env: DistEnv) -> Iterator[None]:
    """Around the work of a process group this process created: an error leaves the group
    alone. Peers may still sit inside a collective with this rank, and on NCCL destroying the
    group can then block until the timeout and hide the real error; the process exits and
    torchrun's report names the rank that failed. A world of one has no peers, and must not
    leave a group behind for the next caller in the same process (a notebook, a test)."""
    global _group_left_alive
    try:
        yield
    except BaseException:
        if env.world_size == 1:
            dist.destroy_process_group()
        else:
            _group_left_alive = True  # run_cli ends the process without the teardown
        raise


@contextmanager
def distributed(
    backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT
) -> Iterator[DistEnv]:
    """Join the process group for the duration of the block and leave it on a clean exit:
    the steps that train_ddp.py's main() spells out, for the pitfalls, benchmarks and tools.

    If a process group already exists (a test harness or a notebook made one), it is used
    as it is and left to its owner.
    """
    env = resolve(backend)
    if env.device.type == "cuda":
        # Bind this process to its GPU *before* the group exists: otherwise every rank's
        # NCCL communicator (and stray allocations) land on cuda:0.
        torch.cuda.set_device(env.device)
    if dist.is_initialized():
        yield env
        return
    dist.init_process_group(
        backend=env.backend,
        timeout=timeout,
        device_id=env.device if env.device.type == "cuda" else None,
        **rendezvous(env),  # env:// under torchrun
    )
    with exit_on_error(env):
        yield env
    dist.destroy_process_group()  # a clean exit: every rank gets here


def rank0_logger(env: DistEnv, name: str = "ddp") -> logging.Logger:
    """A logger that prints on global rank 0 and is silent everywhere else, so the rest of
    the code just logs and never asks which rank it is on."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if env.is_main:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
    return logger


def run_cli(main, argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a UsageError becomes one `error: ...` line and exit status 2.

    Usage errors are the same on every rank (same flags, same files), so only global rank 0
    prints the line; the others exit with the same status silently.

    After an error that left a process group alive (`exit_on_error` does not destroy it),
    the process ends here, through `os._exit`, once the error is reported and the output
    flushed. The group's native threads (gloo's pt_gloo_runloop and gloo_tcp_loop, NCCL's
    watchdog) are still running, and the interpreter's teardown is not safe beside them: a
    C++ thread that needs the GIL while Python finalizes (to free a tensor or run a future's
    callback) is ended with pthread_exit in the middle of C++ code, which aborts the process
    ("terminate called without an active exception", SIGABRT) and replaces the exit status
    the error deserved. Ending without the teardown keeps the status and the one-line error.
    """
    try:
        main(argv)
        return 0
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        status = 2
    except BaseException as e:
        if not _left_alive():
            raise
        status = _report(e)
    if _left_alive():
        _exit_without_teardown(status)
    return status


def _left_alive() -> bool:
    """Did `exit_on_error` leave a group alive, and does it still exist? (A test that only
    pretends to have a group, with init and destroy stubbed out, has nothing to protect.)"""
    return _group_left_alive and dist.is_initialized()


def _report(e: BaseException) -> int:
    """What the interpreter would print for `e`, uncaught; the exit status it would give."""
    if isinstance(e, SystemExit):
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    traceback.print_exception(e)
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def _exit_without_teardown(status: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(status)
