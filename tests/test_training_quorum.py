"""The coordinator's rules (training/quorum.py), driven step by step on an in-process store with
a clock of the test's own: who is in a quorum, when it forms, when its id changes, which step
it resumes from and who heals the others, and when the job must stop."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from core.errors import UsageError
from tests.multiproc import PYTHON, run_cmd
from training.quorum import Coordinator, main


class Replicas:
    """Replicas' side of the protocol written into the store by hand."""

    def __init__(self, **settings) -> None:
        self.store = dist.HashStore()
        self.lines: list[str] = []
        self.c = Coordinator(self.store, log=self.lines.append, **settings)
        self.seq: dict[int, int] = {}

    def register(self) -> int:
        inc = self.store.add("ft/registered", 1)
        self.seq[inc] = 0
        return inc

    def beat(self, *incs: int) -> None:
        for inc in incs:
            self.store.add(f"ft/hb/{inc}", 1)

    def ask(
        self, inc: int, step: int, broken: bool = False, leave: bool = False, stop: str = ""
    ) -> None:
        ask = {"step": step, "broken": broken, "leave": leave, "stop": stop, "label": str(inc)}
        self.store.set(f"ft/ask/{inc}/{self.seq[inc]}", json.dumps(ask))

    def reply(self, inc: int) -> dict | None:
        key = f"ft/reply/{inc}/{self.seq[inc]}"
        if not self.store.check([key]):
            return None
        self.seq[inc] += 1
        return json.loads(self.store.get(key))


def test_quorums_follow_membership_heal_newcomers_and_stop_below_the_floor():
    r = Replicas(min_replicas=2, heartbeat_timeout=1.0, join_timeout=5.0, expect_replicas=3)
    a, b, c = r.register(), r.register(), r.register()
    r.ask(a, 0)
    r.ask(b, 0)
    r.c.poll(0.0)
    assert r.reply(a) is None  # the first quorum waits for the three expected replicas
    r.ask(c, 0)
    r.c.poll(0.1)
    first = [r.reply(i) for i in (a, b, c)]
    assert first[0] == first[1] == first[2]
    assert first[0]["quorum"] == 1 and first[0]["members"] == [a, b, c]

    # Same members, same id: no new group. A live replica that has not asked is waited for.
    r.beat(a, b, c)
    r.ask(a, 1)
    r.ask(b, 1)
    r.c.poll(0.5)
    assert r.reply(a) is None
    r.ask(c, 1)
    r.c.poll(0.6)
    assert [r.reply(i)["quorum"] for i in (a, b, c)] == [1, 1, 1]

    # c dies (its last heartbeat seen at 0.5 s, timeout 1 s): the survivors go on without
    # it, under a new id.
    r.beat(a, b)
    r.c.poll(1.2)
    r.ask(a, 2)
    r.ask(b, 2)
    r.beat(a, b)
    r.c.poll(1.4)
    assert r.reply(a) is None  # c is still within its heartbeat timeout
    r.beat(a, b)
    r.c.poll(2.0)
    q = r.reply(a)
    assert q["quorum"] == 2 and q["members"] == [a, b] and r.reply(b) == q

    # A newcomer at step 0 joins the survivors at step 5: the quorum resumes from step 5 and
    # its source is the lowest incarnation holding it.
    d = r.register()
    r.c.poll(2.1)
    r.ask(d, 0)
    r.ask(b, 5)
    r.ask(a, 5)
    r.beat(a, b, d)
    r.c.poll(2.2)
    q = r.reply(d)
    assert q["members"] == [a, b, d] and q["step"] == 5 and q["source"] == a
    assert q["steps"] == [5, 5, 0] and q["quorum"] == 3
    r.reply(a), r.reply(b)

    # A member whose group broke: a fresh id (a fresh PrefixStore) with the same members.
    r.ask(a, 6, broken=True)
    r.ask(b, 6)
    r.ask(d, 6)
    r.beat(a, b, d)
    r.c.poll(2.3)
    assert [r.reply(i)["quorum"] for i in (a, b, d)] == [4, 4, 4]

    # Two die at once: one replica alive, below --min-replicas 2. After --join-timeout without
    # a replacement the asker is told why the job cannot go on.
    r.beat(a)
    r.ask(a, 7)
    for t in (2.4, 3.0, 3.6, 5.0):
        r.beat(a)
        r.c.poll(t)
    assert r.reply(a) is None
    r.beat(a)
    r.c.poll(9.0)
    assert r.reply(a) == {  # the last asker saves the job's checkpoint, then stops
        "error": "no quorum: 1 replica(s) alive, --min-replicas 2 (none joined for 5 s)",
        "save": True,
    }


def test_a_replica_left_behind_is_dropped_after_the_join_timeout_and_leaving_is_immediate():
    r = Replicas(min_replicas=1, heartbeat_timeout=100.0, join_timeout=2.0)
    a, b = r.register(), r.register()
    r.ask(a, 0)
    r.c.poll(0.0)
    assert r.reply(a) is None  # b is alive (heartbeats) and may still ask
    r.c.poll(2.5)
    assert r.reply(a)["members"] == [a]  # b is stuck: the quorum forms without it
    r.ask(b, 0, leave=True)
    r.ask(a, 1)
    r.c.poll(2.6)
    assert r.reply(b) == {"left": True}
    assert r.reply(a)["members"] == [a]


def test_a_stop_asked_by_one_replica_ends_the_next_quorum_for_all_and_refuses_latecomers():
    r = Replicas(min_replicas=1, heartbeat_timeout=100.0, join_timeout=5.0)
    a, b = r.register(), r.register()
    r.ask(a, 4, stop="SIGTERM")  # a's ranks got the signal; b is still in its step
    r.c.poll(0.0)
    assert r.reply(a) is None  # the stop waits for every live replica, as any quorum does
    r.ask(b, 3)  # behind: healed by the stop quorum, then it stops too
    r.c.poll(0.1)
    q = r.reply(a)
    assert q == r.reply(b) and q["stop"] == "SIGTERM at replica 1"
    assert q["members"] == [a, b] and q["step"] == 4 and q["source"] == a
    # A replica that asks after the stop (a restart that was under way) is told so; it is
    # not a member, so it does not write the checkpoint over the members' one.
    c = r.register()
    r.c.poll(0.2)
    r.ask(c, 0)
    r.c.poll(0.3)
    assert r.reply(c) == {"stopped": 4, "why": "SIGTERM at replica 1"}
    for inc in (a, b, c):
        r.ask(inc, -1, leave=True)
    r.c.poll(0.4)
    assert [r.reply(i) for i in (a, b, c)] == [{"left": True}] * 3 and not r.c.live

    # The coordinator's own signal (request_stop) stops the next quorum the same way.
    r = Replicas(min_replicas=1, heartbeat_timeout=100.0, join_timeout=5.0)
    a = r.register()
    r.c.request_stop("SIGTERM at the coordinator")
    r.ask(a, 0)
    r.c.poll(0.0)
    assert r.reply(a)["stop"] == "SIGTERM at the coordinator"


def test_a_bad_flag_is_one_line_before_torch_loads():
    """python -m training.quorum parses its flags before `import torch` (core/cli.py,
    parse_or_exit): the error comes at once, and torch is never loaded."""
    probe = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('training.quorum', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))\n"
    )
    done = run_cmd([PYTHON, "-c", probe, "--min-replicas", "0"], timeout=60)
    assert done.returncode == 2, done
    assert done.stdout == "[]\n", done.stdout  # neither torch nor numpy was imported
    assert done.stderr == (
        "error: argument --min-replicas: must be a positive integer, got 0 (see --help)\n"
    ), done.stderr


def test_a_port_file_that_cannot_be_written_is_one_line(tmp_path):
    """The coordinator's --port-file in a folder that does not exist: one line naming it, no
    traceback (run_cli prints a UsageError as `error: ...`), and no file left anywhere."""
    with pytest.raises(UsageError, match=r"^cannot write .*no-such-folder/port.*: No such file"):
        main(["--port-file", str(tmp_path / "no-such-folder" / "port")])
    assert list(tmp_path.iterdir()) == []
