"""Preemption that loses nothing: on SIGTERM, Ctrl-C (SIGINT) and --preempt-signal (SIGUSR1
by default), every rank finishes the optimizer step it is in, rank 0 writes a checkpoint,
and all ranks exit with status 0 and one line that says so; `--resume auto` continues bit
for bit.

    with Preemption(args.preempt_signal, env) as preempt:
        for ...:  # after every optimizer step, on every rank
            if preempt.requested() and not last_step_of_epoch:
                save(...)
                preempt.stop(step)  # leaves the `with` block; preempt.stopped_at says where

The signal handler only sets a flag (`received`): a signal that lands in the middle of a
save, a collective or a CUDA call changes nothing there. The flag is read once per optimizer
step, and the ranks must agree on it: torchrun's agent signals its ranks one after the
other, SLURM signals every node on its own, and a signal sent to one rank reaches no other,
so a rank that stopped alone would leave its peers waiting in the next step's all-reduce.
`requested()` is therefore a collective, an all-reduce(MAX) of one int32 (the signal number,
0 for none): every rank sees the same answer after the same step. --trace-comm counts it.
It runs on the CPU: with gloo in the job's own group, with NCCL in a gloo group made for it,
since reading a GPU result every step would make the CPU wait for the GPU's whole step and
stop it from queueing the next one ahead (an all-reduce of 4 bytes over gloo costs a network
round trip, which the CPU spends while the GPU is still busy). That group has the job's
timeout (--timeout), and, like every gloo group, it needs an address that the other nodes can
reach: on several nodes set GLOO_SOCKET_IFNAME as well as NCCL_SOCKET_IFNAME (multi_node.sh's
IFNAME sets both; docs/launching.md).

Catching SIGTERM has a cost: a rank that is stuck (a hang, a peer that died mid-collective)
no longer dies of it, and torchrun, which SIGTERMs every rank when one fails, would wait its
whole shutdown timeout (30 s) and then SIGKILL it. So a SIGTERM also starts a deadline: a
rank that has not left its training loop STUCK_AFTER_S seconds later ends itself, with one
line saying so, before torchrun's SIGKILL. The warning signals (USR1/USR2) start none:
SLURM sends them minutes ahead of the end, and the save may take that long.

Ctrl-C is a stop request like SIGTERM, not a KeyboardInterrupt in whatever line the rank is
running: the run saves and says how to go on. A terminal sends SIGINT to every process of
its foreground group, and plain torchrun, which gets it too, passes it on to its ranks at
once: a SIGINT within SAME_INTERRUPT_S of the first is that same Ctrl-C. A later one is a
second Ctrl-C, which ends the process at once with one line, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

from core.dist import DistEnv
from core.errors import exit_without_teardown, say

# After a SIGTERM, the seconds a rank has to finish its step, save and leave the loop before
# it ends itself as stuck: under torchrun's default shutdown timeout (30 s), after which the
# agent SIGKILLs, so that the rank's own line and exit status are what torchrun reports.
STUCK_AFTER_S = 20.0
# A SIGINT this soon after the first is the same Ctrl-C, passed on by torchrun; a later one is
# the person pressing it again. torchrun passes it on within milliseconds of its own.
SAME_INTERRUPT_S = 2.0


def job_timeout(env: DistEnv) -> timedelta:
    """The timeout the job's process group was created with (train_ddp.py's --timeout)."""
    return dist.group.WORLD._get_backend(env.device).options._timeout


class Preempted(Exception):
    """Raised by `Preemption.stop` to leave the training loop; `Preemption` swallows it."""


class Preemption:
    """Installs the handlers for the duration of a `with` block and restores the previous
    ones after it (a test or a notebook calling main() keeps its own)."""

    def __init__(self, extra: str, env: DistEnv) -> None:
        self.signals = [signal.SIGTERM, signal.SIGINT]
        if extra != "none":
            self.signals.append(signal.Signals[f"SIG{extra}"])
        self.group = None  # the job's group; with another backend than gloo, a gloo one
        if dist.is_initialized() and dist.get_world_size() > 1 and env.backend != "gloo":
            # A collective (every rank, same place), bounded like the job's own group: without
            # `timeout` a gloo group waits 30 minutes for a peer that is gone.
            self.group = dist.new_group(backend="gloo", timeout=job_timeout(env))
        self.received = 0  # the signal number this process got; written by the handler only
        self.agreed: signal.Signals | None = None  # the signal that stops every rank
        self.stopped_at: int | None = None  # the step after which the run stopped
        self._previous: dict[int, object] = {}
        self._rank = env.rank
        self._interrupted_at: float | None = None  # when the first SIGINT came
        self._stop_name = ""  # the first stop request: SIGTERM or SIGINT
        # The deadline's thread is started with the block, not by the handler: a handler may
        # run while the main thread holds a lock that starting a thread needs.
        self._sigterm = threading.Event()
        self._left = threading.Event()
        self._deadline = threading.Thread(target=self._watch, name="preempt-deadline", daemon=True)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is None:
                self._interrupted_at = now
            elif now - self._interrupted_at > SAME_INTERRUPT_S:  # Ctrl-C again: go now
                line = f"rank {self._rank}: interrupted twice, ending without a checkpoint\n"
                os.write(2, line.encode())  # not print(): the handler may interrupt a print
                os._exit(128 + signal.SIGINT)
        self.received = signum  # and nothing that could disturb a save it interrupts
        if signum in (signal.SIGTERM, signal.SIGINT):  # stop requests: the deadline runs
            self._stop_name = self._stop_name or signal.Signals(signum).name
            self._sigterm.set()

    def _watch(self) -> None:
        self._sigterm.wait()
        if self._left.wait(STUCK_AFTER_S):
            return
        line = (
            f"error: rank {self._rank} got {self._stop_name} {STUCK_AFTER_S:.0f} s ago and has not "
            "finished its step: it is stuck (a hang, or a collective whose peers are gone); "
            "ending without a checkpoint"
        )
        say(line)
        exit_without_teardown(128 + signal.Signals[self._stop_name])

    def __enter__(self) -> Preemption:
        # Python runs handlers in the main thread only (and refuses to install them elsewhere);
        # a run started from another thread keeps the default: a signal ends it.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
            self._deadline.start()
        return self

    def __exit__(self, kind, error, tb) -> bool:
        self._left.set()
        self._sigterm.set()  # wakes the deadline's thread, which sees that the loop is left
        if self._deadline.is_alive():
            self._deadline.join()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return kind is Preempted  # the loop was left on purpose: go on after the block

    def requested(self) -> bool:
        """Call on every rank after every optimizer step: True once any rank has received
        one of the signals, on every rank after the same step. A collective until then."""
        if self.agreed is None:
            signum = self.received
            if dist.is_initialized() and dist.get_world_size() > 1:
                flag = torch.tensor([signum], dtype=torch.int32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
                signum = int(flag.item())
            if signum:
                self.agreed = signal.Signals(signum)
        return self.agreed is not None

    def stop(self, step: int) -> None:
        """Leave the training loop after `step`, whose checkpoint has been written."""
        self.stopped_at = step
        raise Preempted(step)

    def report(self, log, total_steps: int, out_dir) -> dict:
        """The run's last line (rank 0) and what main() returns instead of a summary."""
        name = self.agreed.name if self.agreed is not None else "a stop signal"
        log(
            "preempted by %s: stopped after step %d of %d, checkpoint saved in %s; the same "
            "command with --resume auto goes on from there",
            name,
            self.stopped_at,
            total_steps,
            out_dir,
        )
        return {"preempted": name, "steps": self.stopped_at, "total_steps": total_steps}
