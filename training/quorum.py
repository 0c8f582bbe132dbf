"""The coordinator of a fault-tolerant job, and the replicas' side of its protocol.

    python -m training.quorum --port 29400 --min-replicas 2 --expect-replicas 3

A replica is one copy of the model training on its own slice of each step's samples
(train_ddp.py --fault-tolerance, training/fault_tolerant.py). Replicas come and go; before
every optimizer step each one asks this coordinator for the step's *quorum*: who takes part,
under which quorum id, and from which step the quorum goes on. The coordinator is a process of
its own that serves a torch.distributed TCPStore and reads it in a loop; every message is a
key in that store, so there is no other service and no other wire format:

    ft/registered          a counter: a replica's `add` returns its incarnation number, unique
                           for the life of the coordinator (a restarted replica is a new one)
    ft/hb/<inc>            a counter that the replica's heartbeat thread bumps every
                           --heartbeat-timeout / 5 s; unchanged for --heartbeat-timeout s, the
                           replica is dead and is never taken into a quorum again
    ft/ask/<inc>/<seq>     the replica's seq-th request: {"step": its completed steps,
                           "broken": its last group failed, "leave": it is done, "stop": the
                           signal one of its ranks got (else ""), "label": ...}
    ft/reply/<inc>/<seq>   the answer: the quorum, or {"error": why the job cannot go on, "save":
                           whether this replica writes the job's last checkpoint}, or
                           {"stopped": step} to a replica that asks after the job stopped

A quorum forms once every live replica has asked (a replica that asked and another that is
still computing its step must not split), or once --join-timeout has passed since the first
ask (a replica alive but stuck is left out), and never with fewer than --min-replicas. The
first quorum waits for --expect-replicas askers (or --join-timeout). The quorum id changes
whenever the membership changes or a member reports a broken group, so that each process
group is built on a fresh PrefixStore(f"quorum{id}") and never meets a dead group's keys.
The quorum's step is the highest step among its members; the lowest incarnation holding it is
the source that the others heal from (training/fault_tolerant.py).

A graceful stop is a quorum too: once any asker reports a signal (its ranks got SIGTERM or
SIGINT), or this process gets one itself, the next quorum carries "stop" to all its members,
so every live replica stops after the same step, where its index-0 member writes the job's
checkpoint; a replica that asks later is told the job has stopped. A signalled coordinator
goes on serving until every replica has left (or --join-timeout + STOP_GRACE_S has passed).
"""

from __future__ import annotations

import argparse

from core.cli import Parser, bounded_int, parse_or_exit, positive, positive_float
from core.errors import UsageError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: one node)")
    p.add_argument("--port", type=bounded_int(0, 65535, "a port"), default=0, help="0: a free one")
    p.add_argument(
        "--port-file", default=None, help="write the port chosen here, for a launch script"
    )
    p.add_argument(
        "--min-replicas",
        type=positive,
        default=1,
        help="the smallest quorum; with fewer replicas alive the job stops with an error",
    )
    p.add_argument(
        "--expect-replicas",
        type=positive,
        default=1,
        help="the first quorum waits for this many replicas (or --join-timeout)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=positive_float,
        default=2.0,
        help="seconds without a heartbeat after which a replica is dead",
    )
    p.add_argument(
        "--join-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a quorum waits for live replicas that have not asked yet; also how "
        "long too few replicas may be alive before the job stops",
    )
    args = p.parse_args(argv)
    if args.expect_replicas < args.min_replicas:
        raise UsageError(
            f"--expect-replicas {args.expect_replicas} is below --min-replicas "
            f"{args.min_replicas}: the first quorum could never form"
        )
    return args


if __name__ == "__main__":  # a bad flag: one line at once, before torch's seconds of loading
    parse_or_exit(parse_args)

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from core.errors import run_cli
from core.files import writing

POLL_S = 0.01  # the coordinator's loop: a quorum is answered within about this long
# After its own stop signal, how long the coordinator waits beyond --join-timeout for the
# replicas to finish their step, write the checkpoint and leave.
STOP_GRACE_S = 30.0


@dataclass
class Replica:
    """What the coordinator knows of one incarnation."""

    inc: int
    beat_seen_at: float  # when its heartbeat counter last changed (monotonic seconds)
    beat: int = -1
    seq: int = 0  # the number of its next request
    ask: dict | None = None  # its pending request
    asked_at: float = 0.0


@dataclass
class Coordinator:
    """The coordinator's state and its one loop step, `poll`, over any torch Store (a TCPStore
    in the process; a HashStore in the unit tests, with a clock of their own)."""

    store: dist.Store
    min_replicas: int
    heartbeat_timeout: float
    join_timeout: float
    expect_replicas: int = 1
    log: Callable[[str], None] = print
    quorum_id: int = 0
    members: list[int] = field(default_factory=list)
    live: dict[int, Replica] = field(default_factory=dict)
    registered: int = 0
    too_few_since: float | None = None
    logged: int = 0  # the last quorum id logged: a line per change, not per step
    stop: str = ""  # why the job stops (a signal, and who got it); "" while it goes on
    stopped: tuple[int, set[int]] | None = None  # the stop quorum answered: step, members

    def request_stop(self, why: str) -> None:
        """Stop the job at the next quorum (the first request's reason is kept)."""
        if not self.stop:
            self.stop = why
            self.log(f"stopping ({why}): the next quorum is the last")

    def poll(self, now: float) -> None:
        """Read new replicas, heartbeats and requests from the store; answer when due."""
        count = self.store.add("ft/registered", 0)
        for inc in range(self.registered + 1, count + 1):
            self.live[inc] = Replica(inc, beat_seen_at=now)
            self.log(f"replica #{inc} registered")
        self.registered = count
        for inc, r in list(self.live.items()):
            beat = self.store.add(f"ft/hb/{inc}", 0)
            if beat != r.beat:
                r.beat, r.beat_seen_at = beat, now
            elif now - r.beat_seen_at > self.heartbeat_timeout:
                del self.live[inc]
                self.log(f"replica #{inc} is dead: no heartbeat for {self.heartbeat_timeout:g} s")
                continue
            key = f"ft/ask/{inc}/{r.seq}"
            if r.ask is None and self.store.check([key]):
                r.ask, r.asked_at = json.loads(self.store.get(key)), now
                if r.ask.get("leave"):
                    self._answer(r, {"left": True})
                    del self.live[inc]
                    self.log(f"replica #{inc} has finished")
                    continue
                if r.ask.get("stop"):
                    self.request_stop(f"{r.ask['stop']} at replica {r.ask.get('label', inc)}")
                if self.stopped is not None and inc not in self.stopped[1]:
                    self._answer(r, {"stopped": self.stopped[0], "why": self.stop})
        self._decide(now)

    def _decide(self, now: float) -> None:
        asking = [r for r in self.live.values() if r.ask is not None]
        if not asking:
            self.too_few_since = None
            return
        waited = now - min(r.asked_at for r in asking)
        if len(self.live) < self.min_replicas:
            # Fewer live replicas than a quorum needs: wait --join-timeout for a restarted one
            # to register, then tell the askers that the job cannot go on.
            self.too_few_since = self.too_few_since if self.too_few_since is not None else now
            if now - self.too_few_since >= self.join_timeout:
                error = (
                    f"no quorum: {len(self.live)} replica(s) alive, --min-replicas "
                    f"{self.min_replicas} (none joined for {self.join_timeout:g} s)"
                )
                # The job ends here: the asker furthest on (the lowest incarnation at the
                # highest step) writes its checkpoint first, so that --resume goes on from it.
                top = max(r.ask["step"] for r in asking)
                saver = min(r.inc for r in asking if r.ask["step"] == top)
                for r in asking:
                    self._answer(r, {"error": error, "save": r.inc == saver and top > 0})
                self.log(error)
            return
        self.too_few_since = None
        wanted = self.expect_replicas if self.quorum_id == 0 else 0  # the first quorum
        everyone = len(asking) == len(self.live) and len(asking) >= wanted
        if len(asking) < self.min_replicas or not (everyone or waited >= self.join_timeout):
            return
        members = sorted(r.inc for r in asking)
        if members != self.members or any(r.ask.get("broken") for r in asking):
            self.quorum_id += 1
            self.members = members
        step = max(r.ask["step"] for r in asking)
        quorum = {
            "quorum": self.quorum_id,
            "members": members,
            "labels": [self.live[m].ask.get("label", "") for m in members],
            "steps": [self.live[m].ask["step"] for m in members],
            "step": step,
            "source": min(r.inc for r in asking if r.ask["step"] == step),
        }
        if self.stop:  # the members heal, then stop together; its index 0 saves
            quorum["stop"] = self.stop
            self.stopped = (step, set(members))
        for r in asking:
            self._answer(r, quorum)
        if self.quorum_id != self.logged:
            self.logged = self.quorum_id
            self.log(f"quorum {self.quorum_id}: replicas {members} at step {step}")

    def _answer(self, r: Replica, reply: dict) -> None:
        self.store.set(f"ft/reply/{r.inc}/{r.seq}", json.dumps(reply))
        r.ask, r.seq = None, r.seq + 1


class QuorumLost(UsageError):
    """The job cannot go on: no quorum of --min-replicas, or the coordinator is gone."""

    def __init__(self, message: str) -> None:
        super().__init__(message)  # each replica's rank 0 says it: RANK 0 of its torchrun


def connect(address: str, timeout: float) -> dist.TCPStore:
    """A client of the coordinator's store at HOST:PORT."""
    host, _, port = address.rpartition(":")
    # Tried with a plain socket first: TCPStore's own failure to connect logs a C++ stack
    # trace on stderr for every retry, and the error must stay one line.
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout))
    except OSError as e:  # refused, unreachable, timed out
        reason = e.strerror or type(e).__name__
    except RuntimeError as e:  # DistNetworkError: went away between the two
        reason = str(e).splitlines()[0]
    raise QuorumLost(f"cannot reach the coordinator at {address} ({reason})")


class QuorumClient:
    """A replica's side: register, heartbeat from a thread, ask for each step's quorum."""

    def __init__(self, address: str, label: str, quorum_timeout: float) -> None:
        self.address, self.label, self.quorum_timeout = address, label, quorum_timeout
        self.store = connect(address, quorum_timeout)
        interval = float(self.store.get("ft/heartbeat_timeout")) / 5
        self.inc = self.store.add("ft/registered", 1)
        self.seq = 0
        self._stop = threading.Event()
        # A store client of its own: the main thread may sit in a blocking wait on its own.
        beat_store = connect(address, quorum_timeout)
        self._thread = threading.Thread(
            target=self._beat, args=(beat_store, interval), daemon=True, name="ft-heartbeat"
        )
        self._thread.start()

    def _beat(self, store: dist.TCPStore, interval: float) -> None:
        key = f"ft/hb/{self.inc}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except RuntimeError:  # the coordinator is gone: the next request says so
                return
            self._stop.wait(interval)

    def quorum(self, step: int, broken: bool = False, leave: bool = False, stop: str = "") -> dict:
        """The quorum for the step after `step` completed ones (blocks until it forms), or
        the coordinator's refusal; `stop`: the signal that asks the job to stop, if any."""
        ask = {"step": step, "broken": broken, "leave": leave, "stop": stop, "label": self.label}
        key = f"ft/ask/{self.inc}/{self.seq}"
        reply_key = f"ft/reply/{self.inc}/{self.seq}"
        self.seq += 1
        try:
            self.store.set(key, json.dumps(ask))
            self.store.wait([reply_key], timedelta(seconds=self.quorum_timeout))
            reply = json.loads(self.store.get(reply_key))
        except RuntimeError as e:  # DistStoreError (a timeout), DistNetworkError
            raise QuorumLost(
                f"no quorum within --quorum-timeout {self.quorum_timeout:g} s from the "
                f"coordinator at {self.address} ({str(e).splitlines()[0]})"
            ) from None
        return reply  # {"error": ...} too: the caller may have to save before it stops

    def close(self) -> None:
        """Leave the job: the coordinator stops waiting for this replica at once."""
        self.quorum(-1, leave=True)
        self._stop.set()


def serve(host: str, port: int) -> dist.TCPStore:
    """The coordinator's TCPStore, listening on `host` only (TCPStore itself would bind
    every interface: core/dist.py, loopback_store)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind((host, port))
    except OSError as e:
        raise UsageError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror})"
        ) from None
    server.listen()
    port = server.getsockname()[1]
    return dist.TCPStore(
        host,
        port,
        None,
        True,
        timedelta(seconds=60),
        wait_for_workers=False,
        master_listen_fd=server.detach(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = serve(args.host, args.port)
    store.set("ft/heartbeat_timeout", str(args.heartbeat_timeout))
    if args.port_file:  # whole or absent: written aside, then renamed
        tmp = f"{args.port_file}.tmp-{os.getpid()}"
        with writing(Path(args.port_file)):  # a folder that is not there: one line
            with open(tmp, "w") as f:
                f.write(f"{store.port}\n")
            os.replace(tmp, args.port_file)
    coordinator = Coordinator(
        store,
        args.min_replicas,
        args.heartbeat_timeout,
        args.join_timeout,
        args.expect_replicas,
        log=lambda line: print(f"coordinator: {line}", flush=True),
    )
    coordinator.log(f"listening on {args.host}:{store.port}, --min-replicas {args.min_replicas}")
    signalled: list[str] = []  # the handler only records; the loop acts on it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: signalled.append(signal.Signals(signum).name))
    deadline = None
    while deadline is None or (coordinator.live and time.monotonic() < deadline):
        if signalled and deadline is None:  # the job stops: the replicas save, then leave
            if coordinator.live:  # else there is nothing to stop: the loop ends now
                coordinator.request_stop(f"{signalled[0]} at the coordinator")
            deadline = time.monotonic() + args.join_timeout + STOP_GRACE_S
        coordinator.poll(time.monotonic())
        time.sleep(POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
