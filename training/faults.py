"""A test hook that makes one rank crash or hang at a chosen step, to show what the job does
then. Off unless the environment variable TRAIN_FAULT is set; never set it in real jobs.

    TRAIN_FAULT=kill:1:7      rank 1 SIGKILLs itself right after optimizer step 7
    TRAIN_FAULT=hang:1:7      rank 1 stops answering after step 7 (its peers time out)
    TRAIN_FAULT=raise:0:7     rank 0 raises an exception after step 7 (a crash with a traceback)
    TRAIN_FAULT=kill:1:7:0    the same, in restart attempt 0 only (the default)

A fault fires only in the attempt it names, read from TORCHELASTIC_RESTART_COUNT (set by
torchrun, 0 for the first attempt; a run without torchrun counts as attempt 0). So under
`torchrun --max-restarts 1` the first attempt dies and the restarted group runs through,
which is exactly a preempted or crashed worker followed by an elastic restart.

A second variable slows a run down, so that a test can send a signal in the middle of a step
or of a checkpoint write (tests/test_training_preempt.py):

    TRAIN_SLOW=step:0.2           every rank sleeps 0.2 s after each optimizer step
    TRAIN_SLOW=step:0.2,save:1    ... and for 1 s halfway through each file write (checkpoints,
                                  summary.json: training/checkpoint/files.atomic_write), and
                                  with --async-save before each background write starts
                                  (training/checkpoint/background.py, training/sharded.py)
    TRAIN_SLOW=reduce:0.3         a fault-tolerant replica sleeps 0.3 s before each gradient
                                  all-reduce: a kill then lands while its peers wait in theirs

A third holds a fault-tolerant replica (train_ddp.py --fault-tolerance) back, ready to train,
until a file exists, so that a test can make it join a running job at a moment of its choice:

    TRAIN_JOIN_AFTER=/tmp/go      the replica joins once /tmp/go exists
    TRAIN_HEAL_FAULT=0            replica 0 SIGKILLs itself while it heals another: after
                                  the state's size is sent, before the state
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from core.errors import UsageError

ENV = "TRAIN_FAULT"
KINDS = ("kill", "hang", "raise")
SLOW = "TRAIN_SLOW"
SLOW_PLACES = ("step", "save", "reduce")
JOIN_AFTER = "TRAIN_JOIN_AFTER"
HEAL_FAULT = "TRAIN_HEAL_FAULT"


def heal_fault(replica_id: int) -> None:
    """Die here, as a source half-way through healing, when TRAIN_HEAL_FAULT names us."""
    if os.environ.get(HEAL_FAULT, "") == str(replica_id):
        os.kill(os.getpid(), signal.SIGKILL)


def hold_until_released() -> None:
    """Wait for TRAIN_JOIN_AFTER's file; nothing when unset."""
    path = os.environ.get(JOIN_AFTER, "")
    while path and not os.path.exists(path):
        time.sleep(0.05)


def slow_down(place: str) -> None:
    """Sleep for TRAIN_SLOW's seconds at `place` (one of SLOW_PLACES); nothing when unset."""
    spec = os.environ.get(SLOW, "")
    if not spec:
        return
    try:
        seconds = {k: float(v) for k, v in (item.split(":") for item in spec.split(","))}
        if not set(seconds) <= set(SLOW_PLACES):
            raise ValueError
    except ValueError:
        raise UsageError(
            f"{SLOW}={spec!r}: expected PLACE:SECONDS[,...], PLACE one of {', '.join(SLOW_PLACES)}"
        ) from None
    time.sleep(seconds.get(place, 0.0))


def fault_hook(rank: int) -> Callable[[int], None]:
    """A function to call with the step number after every optimizer step."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return lambda step: slow_down("step")
    try:
        kind, fault_rank, fault_step, *rest = spec.split(":")
        fault_rank, fault_step = int(fault_rank), int(fault_step)
        attempt = int(rest[0]) if rest else 0
        if kind not in KINDS or len(rest) > 1:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"{ENV}={spec!r}: expected KIND:RANK:STEP[:ATTEMPT], KIND kill, hang or raise"
        ) from None
    this_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if rank != fault_rank or attempt != this_attempt:
        return lambda step: slow_down("step")

    def hook(step: int) -> None:
        slow_down("step")
        if step != fault_step:
            return
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exit code: like an OOM kill
        if kind == "raise":
            raise RuntimeError(f"{ENV}: rank {rank} crashes after step {step}")
        while True:  # hang: alive but silent, until the launcher or a deadline kills us
            time.sleep(60)

    return hook
