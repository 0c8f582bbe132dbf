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
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
# tests/test_core_exit.py checks that no backend thread outlives a clean exit.
import torch.distributed.nn.functional  # noqa: F401
from tqdm import tqdm

from core.cli import BACKENDS
from core.errors import UsageError, exit_on_error, silence_stdout

DEFAULT_TIMEOUT = timedelta(minutes=10)


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

    @property
    def device_ids(self) -> list[int] | None:
        """DDP's `device_ids`: this rank's one GPU, or None on the CPU."""
        return [self.device.index] if self.device.type == "cuda" else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={value!r} is not an integer", every_rank=True
        ) from None


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
        raise UsageError(
            f"RANK={rank} is outside WORLD_SIZE={world_size} (ranks are 0 to WORLD_SIZE-1)",
            every_rank=True,  # the other ranks may be fine: this one must say it
        )
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


def rendezvous(env: DistEnv, timeout: timedelta = DEFAULT_TIMEOUT) -> dict:
    """How `init_process_group` finds its peers: under torchrun nothing to add (env://,
    MASTER_ADDR and MASTER_PORT); with no launcher, a world of one needs no network at all
    and gets an in-memory store. With MASTER_ADDR on loopback and no store of torchrun's
    agent to use (launch/cpu_sim.sh), the store is made here, listening on loopback only.

    Refused: torchrun restarts (--max-restarts) with the workers in the agent's store. That
    store outlives a failed attempt with its keys, and torch prefixes nothing per attempt
    there, so a restarted group can read the dead attempt's addresses and fail to connect,
    or wait in the store for keys that never come, for as long as it lasts: 17 silent minutes
    were seen. TORCHELASTIC_RESTART_COUNT cannot serve as the prefix: on several nodes it
    counts each agent's own restarts, which can differ. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 each attempt's rank 0 starts a fresh store."""
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0
    ):
        raise UsageError(
            f"torchrun --max-restarts {os.environ['TORCHELASTIC_MAX_RESTARTS']} needs "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: without it a "
            "restarted group meets in the failed attempt's store and can hang there "
            "(docs/launching.md)"
        )
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        return {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    if _loopback(os.environ.get("MASTER_ADDR", "")) and (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    ):
        return {
            "store": loopback_store(env, timeout),
            "rank": env.rank,
            "world_size": env.world_size,
        }
    return {}


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def loopback_store(env: DistEnv, timeout: timedelta) -> dist.TCPStore:
    """The TCPStore that env:// would make at MASTER_ADDR:MASTER_PORT, with rank 0's server
    socket bound to that loopback address. TCPStore itself listens on every interface (its
    server binds the wildcard address whatever host it is given), so on a machine with a
    network, a CPU simulation would let anyone who can reach the port read and write its
    keys; a socket bound here and handed over (`master_listen_fd`) keeps it on loopback."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if env.rank != 0:
        return dist.TCPStore(host, port, env.world_size, False, timeout)
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::1" if host == "::1" else "127.0.0.1" if host == "localhost" else host, port))
    server.listen()
    # detach: the store owns the socket from here (its server closes it), not Python
    return dist.TCPStore(
        host, port, env.world_size, True, timeout, master_listen_fd=server.detach()
    )


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
        **rendezvous(env, timeout),  # env:// under torchrun
    )
    with exit_on_error(env):
        yield env
    dist.destroy_process_group()  # a clean exit: every rank gets here


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_threads(local_processes: int = 1, workers: int = 0, device: str = "cpu") -> str:
    """Set this process's intra-op threads on purpose, and say how, for the run's first line.

    On CPU, OMP_NUM_THREADS wins if set (the user's choice, or torchrun's 1 with several
    processes per node); otherwise the usable cores are shared out between the processes of
    this node, each rank and each of its DataLoader workers counting as one: more threads than
    cores make every process wait for the others (torch's default is one per core, per
    process). On a machine other jobs are using (the 1-minute load average leaves fewer idle
    cores than that), only the idle cores are shared out: on a 2-core box at load 8, one
    thread ran train_dp.py 3 to 4 times faster than two (README, "Threads"). On a GPU the CPU
    threads matter little and torch's default is kept."""
    if device != "cpu":
        return f"{torch.get_num_threads()} intra-op CPU threads (torch's default; {device} works)"
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given:
        threads = _env_int("OMP_NUM_THREADS", 1)
        why = f"OMP_NUM_THREADS={given}"
    else:
        cores, sharers = usable_cores(), local_processes * (1 + workers)
        threads = max(1, cores // sharers)
        why = f"{cores} core(s) / {local_processes} process(es) on this node"
        if workers:
            why += f" x (1 + {workers} loader worker(s))"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        idle = max(0, round((os.cpu_count() or cores) - load))  # the load counts every core
        if idle // sharers < threads:
            threads = max(1, idle // sharers)
            why += f", load average {load:.1f}: the machine is shared, its idle cores only"
    torch.set_num_threads(threads)
    return f"{threads} intra-op thread(s) per process ({why})"


class StdoutHandler(logging.Handler):
    """Writes each record to stdout through `tqdm.write`, which clears any progress bar on
    the terminal first and redraws it after, so that a log line and a bar never share a
    line. With no bar, it is a plain write to stdout (what a pipe or a log file gets). A
    reader that goes away (`| head`) silences the rest, without an error per line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader is gone (`| head`): the run goes on, unheard
            silence_stdout()
        except Exception:
            self.handleError(record)


def rank0_logger(env: DistEnv, name: str = "ddp") -> logging.Logger:
    """A logger that prints on global rank 0 and is silent everywhere else, so the rest of
    the code just logs and never asks which rank it is on."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if env.is_main:
        handler = StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
    return logger
