"""Run test code on a real multi-process world, without ports and without hangs.

`run_world(fn, world_size, *args)` starts `world_size` fresh processes (forked from a
forkserver, see `_context`), joins them in a gloo process group through a FileStore in a
fresh temporary directory, calls `fn(rank, world_size, *args)` on each and returns the
per-rank results in rank order. A deadline bounds the whole call: past it every child is
killed. When ranks fail, each rank's own traceback is reported, in the order the failures
happened, so the root cause comes first and its peers' secondary
"connection closed" errors come after it.

`run_cmd(argv)` runs a command line (torchrun, a launch script) with a deadline and kills
its whole process group when the deadline passes. `Live(argv)` starts one and lets a test
read its output as it comes, to act at a chosen moment (send a signal after step 3).

GPUs: tests/conftest.py calls `hide_gpus()` before anything can initialise CUDA, so the test
process and every process it starts see none (CUDA_VISIBLE_DEVICES=""), and every test runs
on CPU/gloo even on a host with GPUs. A test marked `gpu` gets them back only in the children
it starts with `run_cmd(..., gpus=True)` / `torchrun(..., gpus=True)`; see `gpu_env()`.
`run_world` ranks always run on CPU with gloo.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

from core.processes import descendants, run_with_deadline

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class WorldFailed(AssertionError):
    pass


# ---------------------------------------------------------------------------- GPUs

# CUDA_VISIBLE_DEVICES as it was before hide_gpus() (None: it was unset).
_real_visible_devices: list[str | None] = []


def hide_gpus() -> None:
    """Make this process, and every process it starts from now on, see no GPU; remember the
    real setting for `gpu_env()`. CUDA reads the variable once, when a process first
    initialises it, so this must run before anything in the process touches CUDA."""
    if not _real_visible_devices:
        _real_visible_devices.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def gpu_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` as a child that may use the GPUs gets it: the real CUDA_VISIBLE_DEVICES back, and
    TF32 off in every process of that child's tree. NVIDIA_TF32_OVERRIDE=0 is NVIDIA's switch
    for it (NVIDIA's "Accelerating AI Training with NVIDIA TF32 Tensor Cores": it overrides
    the defaults and whatever the program asks of its libraries, cuBLAS and cuDNN); it reaches
    the scripts the tests run unchanged (train_ddp.py, pitfalls/) and their workers, which no
    in-process flag set by a test could. PyTorch's
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (set in NGC containers) forces TF32 back on for matmuls
    at PyTorch's level: it is dropped. tests/test_nccl.py checks on a real GPU that matmuls and
    convolutions in such a child have float32 accuracy even when PyTorch asks for TF32."""
    env = dict(env)
    real = _real_visible_devices[0] if _real_visible_devices else env.get("CUDA_VISIBLE_DEVICES")
    if real is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = real
    env["NVIDIA_TF32_OVERRIDE"] = "0"
    env.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)
    return env


def count_gpus(env: Mapping[str, str]) -> int:
    """torch.cuda.device_count() in a fresh interpreter with `env`."""
    code = "import torch; print(torch.cuda.device_count())"
    result = subprocess.run(
        [PYTHON, "-c", code], env=dict(env), capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise RuntimeError(last[0])
    return int(result.stdout.split()[-1])


@functools.cache
def gpu_count() -> int:
    """GPUs the `gpu` tests may use. Counted in a child: the test process must not initialise
    CUDA (it would not see the GPUs anyway, and CUDA state does not survive the forks that
    start ranks). Where no NVIDIA GPU is plausible (no /dev/nvidia0, no nvidia-smi) the answer
    is 0 without starting anything."""
    if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        return 0
    return count_gpus(gpu_env(os.environ))


# ----------------------------------------------------------------------- run_world


def _child(rank: int, world_size: int, store_path: str, pg_timeout: float, fn, args, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store_path, world_size),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # bytes, not shared-memory tensors: safe after the child exits
        report = (rank, True, buf.getvalue(), time.monotonic())
    except BaseException:
        report = (rank, False, traceback.format_exc(), time.monotonic())
    # Report before leaving the group: a failing rank's exit is what makes its peers fail,
    # and its own error must be timestamped (and so listed) before theirs.
    results.put(report)
    if dist.is_initialized():
        dist.destroy_process_group()


# What a rank needs before it can run anything: importing these takes most of a rank's
# start-up (torch ~2 s, and DDP's constructor pulls in torch._dynamo, ~2 s more).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torchvision", "train_ddp"]


def _context() -> mp.context.BaseContext:
    """The forkserver start method: a clean server process, started once per test session,
    imports PRELOAD; every rank is then forked from it. Like spawn (the macOS/Windows
    default), a rank inherits nothing from the test process, no threads, no CUDA state, no
    open process group; unlike spawn, it does not import torch again, which makes a world
    start in well under a second instead of several seconds per rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_world(
    fn: Callable, world_size: int, *args, timeout: float = 60.0, pg_timeout: float = 30.0
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh ranks; return their results."""
    import torch

    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="world-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_child, args=(r, world_size, store, pg_timeout, fn, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[bool, object, float]] = {}
        failed_at = None
        try:
            while len(got) < world_size:
                now = time.monotonic()
                # After the first failure, give the peers a moment to report their own errors.
                limit = min(deadline, failed_at + 2.0) if failed_at else deadline
                if now >= limit:
                    break
                try:
                    rank, ok, payload, t = results.get(timeout=min(0.2, limit - now))
                    got[rank] = (ok, payload, t)
                    if not ok and failed_at is None:
                        failed_at = time.monotonic()
                except queue.Empty:
                    for r, p in enumerate(procs):
                        if r not in got and p.exitcode not in (None, 0):
                            got[r] = (False, f"rank {r} died with exit code {p.exitcode}", now)
                            failed_at = failed_at or now
        finally:
            for p in procs:
                p.join(timeout=0.5 if len(got) == world_size else 0)
                if p.is_alive():
                    p.kill()
                    p.join()
    failures = sorted((t, r, msg) for r, (ok, msg, t) in got.items() if not ok)
    missing = [r for r in range(world_size) if r not in got]
    if failures or missing:
        parts = [f"--- rank {r} ---\n{msg}" for _, r, msg in failures]
        if missing:
            why = "killed after the first failure" if failures else f"timed out after {timeout}s"
            parts.append(f"--- ranks {missing}: no result ({why}) ---")
        raise WorldFailed("\n".join(parts))
    return [torch.load(io.BytesIO(got[r][1]), weights_only=False) for r in range(world_size)]


def run_cmd(
    argv: Sequence[str],
    timeout: float = 90.0,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    check: bool = False,
    gpus: bool = False,
) -> subprocess.CompletedProcess:
    """Run a command with a deadline; on timeout kill its process group and every process
    it started. `gpus=True` (tests marked `gpu` only) lets it see the GPUs: `gpu_env()`."""
    base = gpu_env(os.environ) if gpus else os.environ
    full_env = {**base, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    code, out, err = run_with_deadline(argv, timeout, full_env, cwd)
    if code is None:
        raise AssertionError(
            f"{' '.join(argv)} did not finish within {timeout}s\n--- stdout ---\n{out}\n"
            f"--- stderr ---\n{err}"
        )
    result = subprocess.CompletedProcess(list(argv), code, out, err)
    if check and code != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )
    return result


def torchrun(
    script_and_args: Sequence[str], nproc: int = 2, timeout: float = 90.0, **kw
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ...` through the venv's interpreter."""
    return run_cmd(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *script_and_args,
        ],
        timeout=timeout,
        **kw,
    )


class Live:
    """A command started in a session of its own, whose output (stdout and stderr merged) a
    test reads line by line while it runs. Every wait takes a deadline (time.monotonic());
    past it the command and every process it started are killed and the test fails."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, deadline: float) -> str | None:
        """The next line matching `pattern`, or None when the output ends without one."""
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no {pattern!r} in time:\n{self.output()}") from None
            if line is None:
                return None
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, deadline: float) -> int:
        """Wait for the exit and the rest of the output; the exit status."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not end in time:\n{self.output()}") from None
        while self.wait_for(r"(?!)", deadline) is not None:  # a pattern that never matches
            pass
        return self.proc.returncode

    def kill(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def output(self) -> str:
        return "".join(self.lines)
