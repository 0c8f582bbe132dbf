"""Checkpoints written in the background (--async-save): training goes on during the write.

A save has two halves. The snapshot, on the training thread at the step: every tensor of the
checkpoint is copied off the training tensors into CPU memory (pinned where the source is on
a GPU, so the copy is a DMA that the step's stream orders before the next step's kernels);
after it, the optimizer may change the live tensors in place without touching what is
written. The write, on a background thread: serialisation, the temporary file, fsync,
rename, the pointer, exactly as a synchronous save does it, so a kill at any moment still
leaves the previous checkpoint as the newest and never half a file under a real name.

A thread, not a process: the snapshot is already in this process's memory, and the bulk of
the write's time goes to system calls (write(2) of each storage, fsync(2)) that release the
GIL; a process would need the snapshot copied once more into shared memory, its own
`import torch` (seconds) and a fork of a process that holds CUDA and gloo threads, which is
unsafe. torch's own `dcp.async_save` uses a thread by default for the same reasons. The thread
runs at a lower CPU priority (`yield_to_training`).

At most one save is in flight: the next save first waits for the previous write to finish
(and says so in the log when it had to wait). Unbounded, a slow disk would pile up snapshots
until memory runs out, and each snapshot's buffers are reused by the next one, which is only
safe once the previous write has finished with them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from core.dist import DistEnv
from core.errors import WRITE_ERRORS, write_error_line
from training.checkpoint.contents import CheckpointError
from training.faults import slow_down

# The writer thread's nice value (Linux: a per-thread attribute). Where the training's threads
# keep every core busy (CPU training, or a shared box), an equal-priority writer takes half of
# a core's time from the step it overlaps; at +10 the scheduler gives it about a tenth while
# the training wants the core, and all of an idle one (a GPU job's CPU is mostly idle).
WRITER_NICE = 10


def yield_to_training() -> None:
    """Lower the calling thread's CPU priority to WRITER_NICE (Linux only: elsewhere the same
    call would renice the whole process)."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):  # a container that forbids it: run as it is
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class Snapshot:
    """Copies of checkpoint trees in CPU memory, whose buffers are kept from one save to the
    next (pinned memory is slow to allocate). Storage for storage, like torch.save: tensors
    that share a storage (a tied head, views of one flat buffer) share it in the copy too."""

    def __init__(self, whole_storages: bool = True) -> None:
        # torch.save writes each tensor's whole storage, DCP only the tensor's own elements:
        # the copy takes what the writer will write (a view of a large flat buffer: its part).
        self.whole_storages = whole_storages
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._events: list = []

    def take(self, tree):
        """A copy of `tree` (dicts, lists, tuples, tensors, plain values) that later in-place
        changes to its tensors do not reach. Call only while no write reads the last copy."""
        used: dict[tuple, torch.Tensor] = {}
        cuda: set[torch.device] = set()
        out = self._copy(tree, used, cuda)
        self._buffers = used  # buffers of tensors that are gone are freed
        # The GPU copies are queued on each device's current stream, ahead of the next
        # step's kernels that change the sources; the writer waits for these events.
        self._events = []
        for device in cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)
        return out

    def ready(self) -> None:
        """Block until the copies from GPUs have landed (the writer thread calls this)."""
        for event in self._events:
            event.synchronize()

    def _copy(self, tree, used: dict, cuda: set):
        # A DTensor exists only once torch.distributed.tensor is imported (training/sharded.py
        # does); importing it here just to ask would cost every single-file run seconds.
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor is not None and isinstance(tree, dtensor.DTensor):
            # A rank's shard of a sharded tensor (DCP's staging): its part only, as a DTensor
            # of the same layout. Built from the spec, as DCP's own staging builds its CPU
            # copies: from_local would move a CPU shard back to a GPU mesh's device.
            local = self._compact(tree.to_local().detach(), used, cuda)
            return dtensor.DTensor(local, tree._spec, requires_grad=False)
        if isinstance(tree, torch.Tensor):
            copier = self._tensor if self.whole_storages else self._compact
            return copier(tree.detach(), used, cuda)
        if isinstance(tree, dict):
            return {k: self._copy(v, used, cuda) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self._copy(v, used, cuda) for v in tree]
        if isinstance(tree, tuple):
            return tuple(self._copy(v, used, cuda) for v in tree)
        return copy.deepcopy(tree)  # numbers, strings, the Python RNG's state: cheap

    def _buffer(self, key: tuple, shape: tuple, dtype: torch.dtype, used: dict) -> torch.Tensor:
        buffer = used.get(key, self._buffers.get(key))
        if buffer is None:
            buffer = torch.empty(shape, dtype=dtype, pin_memory=key[0].type == "cuda")
        used[key] = buffer
        return buffer

    def _fill(self, buffer, source, device: torch.device, cuda: set) -> None:
        on_gpu = device.type == "cuda"
        buffer.copy_(source, non_blocking=on_gpu)
        if on_gpu:
            cuda.add(device)

    def _tensor(self, t: torch.Tensor, used: dict, cuda: set) -> torch.Tensor:
        """`t` on a copy of its whole storage, at the same offset and strides: what
        torch.save writes; a storage that several tensors share is copied once."""
        source = t.untyped_storage()
        key = (t.device, "storage", source.data_ptr(), source.nbytes())
        if key not in used:
            buffer = self._buffer(key, (source.nbytes(),), torch.uint8, used)
            self._fill(buffer.untyped_storage(), source, t.device, cuda)
        view = torch.empty(0, dtype=t.dtype)
        return view.set_(used[key].untyped_storage(), t.storage_offset(), t.shape, t.stride())

    def _compact(self, t: torch.Tensor, used: dict, cuda: set) -> torch.Tensor:
        """A contiguous copy of `t` alone (DCP writes the shard, not the buffer around it)."""
        key = (t.device, "tensor", t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        buffer = self._buffer(key, tuple(t.shape), t.dtype, used)
        self._fill(buffer, t, t.device, cuda)
        return buffer


class BackgroundWriter:
    """One background write at a time, and the agreement of every rank on how it went.

    `start` hands a write to a fresh thread; `settle` (a collective: every rank calls it at
    the same point, before the next save and at the end of the run) waits for it and raises
    the same CheckpointError on every rank if any rank's write failed."""

    def __init__(self, env: DistEnv, log: Callable[..., None]) -> None:
        self.env = env
        self.log = log
        self.snapshot = Snapshot()
        self._thread: threading.Thread | None = None
        self._what = ""  # "step 12": the save in flight, for the log and for errors
        self._error: str | None = None

    def start(self, what: str, write: Callable[[], None]) -> None:
        """Run `write()` on a new thread; the previous write must have been settled."""
        assert self._thread is None, "settle() the previous save first"
        self._what, self._error = what, None
        self._thread = threading.Thread(
            target=self._run, args=(write,), name="checkpoint-writer", daemon=True
        )
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            yield_to_training()
            slow_down("save")  # test hook (TRAIN_SLOW): training goes on before a byte is read
            self.snapshot.ready()
            write()
        except OSError as e:
            self._error = write_error_line(e) if e.errno in WRITE_ERRORS else f"{e}"
        except BaseException as e:  # noqa: BLE001 - reported on the training thread by settle()
            self._error = (str(e).strip().splitlines() or [type(e).__name__])[0]  # one line

    def busy(self) -> bool:
        """Is a write in flight now (benchmarks/bench_async_save.py sorts steps by it)?"""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, before: str) -> None:
        """Wait, on this rank alone, for the write in flight; log it if that took a while.
        The run's error paths call this for a write that involves no other rank."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            tic = time.perf_counter()
            thread.join()
            waited = time.perf_counter() - tic
            # A write that ends as the wait begins: a line saying "waited 0.00 s" is no news.
            if round(waited, 2) > 0:  # the threshold is the line's own precision, %.2f
                self.log(
                    "%s waited %.2f s for the checkpoint of %s, still being written",
                    before,
                    waited,
                    self._what,
                )
        self._thread = None

    def settle(self, before: str) -> None:
        """On every rank: wait for the write in flight, then agree on whether every rank's
        part was written. A failure anywhere is one CheckpointError, the same on every rank
        (the lowest rank's reason that has one), so all ranks leave together."""
        self.wait(before)
        error, self._error = self._error, None
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            if error is not None:
                raise CheckpointError(f"the checkpoint of {self._what} was not written: {error}")
            return
        flag = torch.tensor([0 if error is None else 1], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        reason = next(e for e in errors if e is not None)
        raise CheckpointError(f"the checkpoint of {self._what} was not written: {reason}")
