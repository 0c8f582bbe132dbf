"""The harness itself: results come back in rank order, a failing rank is named with its own
traceback, and a hung world is killed at the deadline instead of hanging the suite."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import PYTHON, WorldFailed, run_cmd, run_world


def _allreduce_rank_plus_one(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, t.item()


def _rank1_raises_rank0_waits(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # never completes: rank 1 is gone


def test_results_in_rank_order_and_failures_reported():
    assert run_world(_allreduce_rank_plus_one, 3) == [(r, 6.0) for r in range(3)]

    start = time.monotonic()
    with pytest.raises(WorldFailed) as info:
        run_world(_rank1_raises_rank0_waits, 2, timeout=30, pg_timeout=60)
    text = str(info.value)
    assert text.startswith("--- rank 1 ---"), text  # the root cause first, then its peers
    assert "ValueError: boom on rank 1" in text
    # Rank 0 is stuck in a barrier with a 60 s process-group timeout: the harness must not
    # wait for it, it kills it a moment after rank 1's failure.
    assert time.monotonic() - start < 25


def test_run_cmd_deadline_also_kills_children_in_their_own_session():
    # torchrun starts its workers with start_new_session: they survive a kill of the
    # launcher's process group and hold its output pipes open.
    code = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)"
    )
    start = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 2"):
        run_cmd([PYTHON, "-c", code], timeout=2)
    assert time.monotonic() - start < 15
