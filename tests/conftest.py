"""Session set-up: every test runs on CPU/gloo, also on a host with GPUs.

Importing this file (pytest does it before it imports any test module) hides the GPUs from
the test process and from every process it starts: CUDA_VISIBLE_DEVICES="" (see
tests/multiproc.py). Code under test that picks nccl and cuda:0 "when CUDA is available"
therefore sees none, as on a CPU box, and no test has to ask torch whether CUDA exists.

Tests that need GPUs are marked `@pytest.mark.gpu(n)` (n GPUs, default 1). They are skipped
when the machine has fewer, counted without initialising CUDA here; they get the GPUs back
only in the children they start with `gpus=True`.
"""

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

import pytest

from core.processes import descendants
from tests.multiproc import gpu_count, hide_gpus

hide_gpus()
# The scripts run in this process (train_dp.main(...)) choose their threads from this
# (core.dist.choose_threads) and so keep the one thread `one_thread` sets below.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: no GPU count when no gpu test runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = [(item, item.get_closest_marker("gpu")) for item in items]
    wanted = [(item, marker.args[0] if marker.args else 1) for item, marker in wanted if marker]
    if not wanted:
        return
    try:
        have, why = gpu_count(), ""
    except Exception as e:  # a broken driver, a timeout: say so in every skip
        have, why = 0, f"; counting them failed: {e}"
    for item, need in wanted:
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), {have} here{why}"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the work done inside the pytest process. The tests' ranks
    share two cores with it; several OpenMP threads fighting over them run up to ten times
    slower than one. It also keeps in-process runs bit-comparable with the ranks, which
    use one thread each (float sums depend on how work is split between threads)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every test's deadline, in seconds. A test that runs past it is a hang (the multi-process
# helpers give each world and command its own, shorter deadline; this one catches what runs
# in the test process itself, such as a loader worker that never answers): the session then
# prints the stacks of the test process's threads, kills every process it started and ends
# with status 3, instead of waiting for CI's own limit with nothing said. Default tests take
# seconds; the longest slow tests take about 5 minutes on the 2-core reference box.
# TEST_DEADLINE_SCALE=2 doubles both on a slower machine.
DEADLINE_S = {"default": 300.0, "slow": 1200.0}


class _Watchdog:
    """One daemon thread that checks the running test's deadline every second."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.test: tuple[str, float, float] | None = None  # (node id, limit, ends at)
        threading.Thread(target=self._watch, name="test-deadline", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            test = self.test
            if test is not None and time.monotonic() > test[2]:
                self._expire(*test[:2])

    def _expire(self, name: str, limit: float) -> None:
        capture = self.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            sys.stderr.write(f"\nerror: {name} still runs after its deadline of {limit:.0f} s; "
                             "the stacks of the test process's threads:\n")  # fmt: skip
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            children = descendants(os.getpid())
            for pid in children:
                with contextlib.suppress(OSError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
            sys.stderr.write(f"error: killed its {len(children)} child process(es); "
                             "the session ends here\n")  # fmt: skip
            sys.stderr.flush()
        os._exit(3)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest):
    watchdog = request.config.stash.get(_WATCHDOG, None)
    if watchdog is None:  # the session's first test starts it
        watchdog = request.config.stash[_WATCHDOG] = _Watchdog(request.config)
    limit = DEADLINE_S["slow" if request.node.get_closest_marker("slow") else "default"]
    limit *= float(os.environ.get("TEST_DEADLINE_SCALE", "1"))
    watchdog.test = (request.node.nodeid, limit, time.monotonic() + limit)
    yield
    watchdog.test = None


_WATCHDOG = pytest.StashKey["_Watchdog"]()
