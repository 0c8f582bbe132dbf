"""Name the rank that stalls, within --stall-timeout seconds, instead of waiting out the
process group's --timeout and then blaming the healthy rank that timed out.

Every rank counts the points of the training loop it has passed where all ranks meet (each
micro-batch of an optimizer step, and the end of the step) and publishes the count in the
job's store, from a background thread, about once a second. Ranks move through these points
in lockstep, so while they all wait for one that has stopped, the stopped one's count is the
lowest and stays put; the others are one point ahead of it. Global rank 0's thread watches
all the counts: a rank whose count is behind another's and has not moved for --stall-timeout
seconds is stalled. Rank 0 posts the verdict in the store and prints one `error:` line naming
the stalled rank; every rank's thread (the stalled one's too, while it can: a stopped process
cannot) writes that line as its torchrun error file and ends its process, so torchrun's
report shows the line whichever rank it names as the root cause.

What it does not watch: start-up before the loop (building the data and the model,
resuming), evaluation and checkpoint writing (every rank is between the same two points
there, so their counts are equal); there --timeout still applies. What it may blame: a rank
that takes --stall-timeout seconds longer than the others to load one batch.
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch.distributed as dist

from core.dist import DistEnv
from core.errors import exit_without_teardown, say, write_error_file

# Keys of this restart attempt only: torchrun's shared store keeps a dead attempt's keys.
PREFIX = f"heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
VERDICT = PREFIX + "stalled"


class Heartbeat:
    """Call `beat(step)` at every meeting point of the loop; `close()` at the end. A world of
    one, or a `timeout` of 0, watches nothing."""

    def __init__(self, env: DistEnv, timeout: float) -> None:
        self.env, self.timeout = env, timeout
        self.count, self.step = 0, 0
        self._stop = threading.Event()
        self._thread = None
        if env.world_size == 1 or timeout <= 0 or not dist.is_initialized():
            return
        self.store = dist.distributed_c10d._get_default_store()
        self.store.set(self._key(env.rank), "0 0")
        self.interval = min(1.0, timeout / 5)
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"{PREFIX}{rank}"

    def beat(self, step: int) -> None:
        """This rank reached the next meeting point, in optimizer step `step`. Ranks must call
        it at the same points, the same number of times (the loop does: same batches)."""
        self.count += 1
        self.step = step

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ---- the background thread

    def _run(self) -> None:
        published = None
        last: dict[int, tuple[int, float]] = {}  # rank -> (count, when it was first seen)
        keys = [self._key(r) for r in range(self.env.world_size)]
        while not self._stop.wait(self.interval):
            try:
                now = (self.count, self.step)
                if now != published:
                    self.store.set(self._key(self.env.rank), f"{now[0]} {now[1]}")
                    published = now
                if self.store.check([VERDICT]):
                    self._verdict(json.loads(self.store.get(VERDICT)))  # ends the process
                if self.env.rank == 0 and self.store.check(keys):
                    self._watch(keys, last)
            except Exception:  # the store is gone: the job is ending, nothing to watch
                return

    def _watch(self, keys: list[str], last: dict[int, tuple[int, float]]) -> None:
        counts = [tuple(map(int, v.split())) for v in map(bytes.decode, self.store.multi_get(keys))]
        clock = time.monotonic()
        for rank, (count, _) in enumerate(counts):
            if last.get(rank, (None,))[0] != count:
                last[rank] = (count, clock)
        ahead = max(count for count, _ in counts)
        stalled = [
            r
            for r, (count, _) in enumerate(counts)
            if count < ahead and clock - last[r][1] >= self.timeout
        ]
        if stalled:
            waiting = [r for r, (count, _) in enumerate(counts) if count == ahead]
            verdict = {
                "stalled": stalled,
                "steps": [counts[r][1] for r in stalled],
                "waiting": waiting,
                "seconds": round(clock - min(last[r][1] for r in stalled)),
            }
            self.store.set(VERDICT, json.dumps(verdict))

    def _verdict(self, verdict: dict) -> None:
        stalled = verdict["stalled"]
        where = ", ".join(
            f"rank {r} in step {s}" for r, s in zip(stalled, verdict["steps"], strict=True)
        )
        line = (
            f"error: stalled: {where} made no progress for {verdict['seconds']} s while "
            f"rank(s) {', '.join(map(str, verdict['waiting']))} waited for it "
            f"(--stall-timeout {self.timeout:g})"
        )
        # Every rank ends now, each with the line as its torchrun error file: whichever rank
        # torchrun names as the root cause (the first to exit; ranks that wait in a collective
        # would otherwise fail with "Connection closed by peer" once the stalled one is gone),
        # its report shows the line that names the stalled rank. Rank 0 prints it, once.
        if self.env.rank == 0:
            say(line)  # stderr and error file
        else:
            write_error_file(line)
        exit_without_teardown(1)
