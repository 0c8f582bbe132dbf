"""Session set-up: every test runs on CPU/gloo, also on a host with GPUs.

Importing this file (pytest does it before it imports any test module) hides the GPUs from
the test process and from every process it starts: CUDA_VISIBLE_DEVICES="" (see
tests/multiproc.py). Code under test that picks nccl and cuda:0 "when CUDA is available"
therefore sees none, as on a CPU box, and no test has to ask torch whether CUDA exists.

Tests that need GPUs are marked `@pytest.mark.gpu(n)` (n GPUs, default 1). They are skipped
when the machine has fewer, counted without initialising CUDA here; they get the GPUs back
only in the children they start with `gpus=True`.
"""

import os

import pytest

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
