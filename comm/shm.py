"""An all-reduce through shared memory, for the ranks of one node: what NCCL does inside a
node instead of sockets, written out on the CPU.

gloo sends every byte of a CPU all-reduce through a TCP socket, even between two processes
of one machine: the kernel copies it into a socket buffer and out again, and each message
pays a system call and a wake-up. Here the ranks of a group map one shared buffer instead:

    1. copy in       rank r copies its tensor into slot r of the buffer     (S bytes)
    2. barrier       every slot is written
    3. reduce        rank r adds up its own chunk of every slot, in slot order (0 + 1 + ...),
                     and writes the sum into slot 0's copy of that chunk     (S/W per slot)
    4. barrier       every chunk is summed
    5. copy out      every rank copies slot 0 (the whole sum) into its tensor (S bytes)

Each rank reads W chunks of S/W and writes one in step 3: the reduction is split W ways, as
in a ring's reduce-scatter, but no byte crosses a socket. Tensors that already live in the
buffer (`ShmWorld.slot`, the way the `--sync` modes' buckets would) skip steps 1 and 5.

The barrier is a counter per rank in a second shared mapping (each on its own cache line):
a rank stores its call count and spins until every counter has reached it (yielding the
CPU while it waits, so more ranks than cores still make progress). It relies on the CPU
making stores visible in program order (x86's total store order), which is why the
transport refuses other processors. Two sets of slots are used in turn, so a rank may start
call k+1 while a slower one still copies out call k: two barriers per call, not three.

The buffer lives in a file under /dev/shm (tmpfs: memory, not disk) that the group's first
rank creates and, once every rank has mapped it, unlinks at once: from then on the memory
belongs to the mappings alone, and the kernel frees it when the last rank exits, also
after a SIGKILL. Nothing is left behind on any exit path.

Sums are taken in slot order, so integers are exact and equal `dist.all_reduce`'s; floats
equal gloo's at 2 ranks (one addition, commutative) and may differ from gloo's order by
rounding at 3 or more.
"""

from __future__ import annotations

import functools
import os
import platform
import secrets
import socket
import time

import torch
import torch.distributed as dist

from comm.ring import chunk_bounds
from core.errors import UsageError

SHM_DIR = "/dev/shm"
FLAG_STRIDE = 16  # int64 counters 128 bytes apart: one per cache line pair, no false sharing
MIN_SLOT_BYTES = 2**20
SPINS_BEFORE_YIELD = 64
DEADLINE_S = 300.0  # a peer that never arrives: fail loudly instead of spinning forever


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class ShmWorld:
    """A shared buffer for the ranks of `group` (all on this node), and the all-reduce
    through it. Collective: every rank of the group constructs it, in the same order as
    its other collectives."""

    def __init__(self, group: dist.ProcessGroup | None = None, deadline_s: float = DEADLINE_S):
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise UsageError(
                "the shared-memory transport's barrier relies on x86's store order; "
                f"this machine is {platform.machine()}: use gloo's all-reduce"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.deadline_s = deadline_s
        hosts = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        if len(set(hosts)) > 1:
            raise UsageError(
                "the shared-memory transport needs every rank of the group on one node; "
                f"these ranks run on {len(set(hosts))} hosts"
            )
        self.calls = 0
        self.slot_bytes = 0
        self.data: torch.Tensor | None = None
        self.flags = self._map(self.world * FLAG_STRIDE * 8).view(torch.int64)
        self.flags[self.rank * FLAG_STRIDE] = 0
        self.barrier_s = 0.0  # time spent waiting in barriers: the synchronisation's cost

    # ---- the shared mapping
    def _map(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` mapped by every rank of the group (collective)."""
        name = [f"ddp-shm-{os.getpid()}-{secrets.token_hex(8)}" if self.rank == 0 else None]
        ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        dist.broadcast_object_list(name, src=ranks[0], group=self.group)
        path = os.path.join(SHM_DIR, name[0])
        if self.rank == 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
        dist.barrier(group=self.group)
        buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        dist.barrier(group=self.group)  # every rank has mapped it: the name can go
        if self.rank == 0:
            os.unlink(path)
        return buffer

    def _ensure(self, nbytes: int) -> None:
        """Slots of at least `nbytes` (every rank asks for the same size: the tensors of a
        collective agree in size, so every rank grows the buffer at the same call)."""
        if nbytes <= self.slot_bytes:
            return
        self.slot_bytes = max(MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
        self.data = None  # drop the old mapping before making a larger one
        self.data = self._map(2 * self.world * self.slot_bytes)

    def slot(self, rank: int, numel: int, dtype: torch.dtype, parity: int) -> torch.Tensor:
        """Slot `rank` of slot set `parity` as `numel` elements of `dtype`."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        start = (parity * self.world + rank) * self.slot_bytes
        return self.data[start : start + _round_up(nbytes, 8)][:nbytes].view(dtype)

    def input_slot(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Where this rank may write the data of its next `reduce_in_place` call (a tensor
        that lives in shared memory, as a gradient bucket could)."""
        self._ensure(numel * torch.empty((), dtype=dtype).element_size())
        return self.slot(self.rank, numel, dtype, self.calls % 2)

    # ---- the synchronisation
    def _barrier(self) -> None:
        """Arrive, then wait until every rank of the group has arrived at the same point."""
        tic = time.perf_counter()
        target = self.calls * 2 + self._phase
        self._phase += 1
        self.flags[self.rank * FLAG_STRIDE] = target
        counters = self.flags[::FLAG_STRIDE]
        spins = 0
        while int(counters.min()) < target:
            spins += 1
            if spins % SPINS_BEFORE_YIELD == 0:
                os.sched_yield()
                if time.perf_counter() - tic > self.deadline_s:
                    late = [r for r, c in enumerate(counters.tolist()) if c < target]
                    raise RuntimeError(
                        f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                        f"{self.deadline_s:.0f} s (a rank died or left the collective order)"
                    )
        self.barrier_s += time.perf_counter() - tic

    # ---- the collective
    def reduce_in_place(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """All-reduce (sum) what every rank wrote into its `input_slot(numel, dtype)`; return
        the sum, a shared view valid until the call after next."""
        parity = self.calls % 2
        self._phase = 1
        self.calls += 1
        slots = [self.slot(r, numel, dtype, parity) for r in range(self.world)]
        self._barrier()  # every slot written
        a, b = chunk_bounds(numel, self.world)[self.rank]
        if b > a:
            mine = slots[0][a:b]
            for k in range(1, self.world):
                mine.add_(slots[k][a:b])
        self._barrier()  # every chunk summed
        return slots[0]

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: dist.ReduceOp = dist.ReduceOp.SUM,
        group: dist.ProcessGroup | None = None,
        async_op: bool = False,
    ) -> None:
        """`dist.all_reduce(tensor)` (SUM) through the shared buffer, in place; synchronous
        (returns None, which communicate() accepts for a finished collective)."""
        if op != dist.ReduceOp.SUM:
            raise ValueError("the shared-memory all-reduce sums only")
        if group is not self.group:
            raise ValueError("this ShmWorld was made for another process group")
        numel = tensor.numel()
        if numel == 0:
            return None
        with torch.no_grad():
            self.input_slot(numel, tensor.dtype).copy_(tensor.reshape(-1))
            total = self.reduce_in_place(numel, tensor.dtype)
            if tensor.is_contiguous():
                tensor.view(-1).copy_(total)
            else:
                tensor.copy_(total.view(tensor.shape))
        return None

    def op(self) -> functools.partial:
        """This world's all-reduce as a CommOp (communicate(), the `--sync` modes' all_reduce
        argument), carrying its group so that averaging divides by the group's size."""
        return functools.partial(self.all_reduce, group=self.group)


def shm_all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum `tensor` over the ranks of `group` through shared memory, in place: the study's
    one-call form, with one ShmWorld per group kept for the process's life."""
    key = group or dist.group.WORLD
    world = _WORLDS.get(key)
    if world is None:
        world = _WORLDS[key] = ShmWorld(group)
    world.all_reduce(tensor, group=group)


_WORLDS: dict[object, ShmWorld] = {}
