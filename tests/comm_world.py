"""One 4-rank world for test_comm_communicate.py, test_parallel_sync.py and
test_benchmarks_gpt.py together.

Starting ranks (each imports torch) is most of what these tests cost, so the files share a
single spawn: the first test that asks for `results()` runs it, the others read what it
returned (or see the same failure).
"""

from __future__ import annotations

import tempfile

from tests.multiproc import run_world

WORLD_SIZE = 4
_cache: dict[str, object] = {}


def _world(rank: int, world_size: int, out_root: str) -> dict:
    from tests.test_benchmarks_gpt import bench_checks
    from tests.test_comm_communicate import communicate_checks
    from tests.test_parallel_sync import sync_checks

    return {
        "communicate": communicate_checks(rank, world_size),
        "sync": sync_checks(rank, world_size, out_root),
        "bench": bench_checks(rank, world_size, out_root),
    }


def results() -> list[dict]:
    """Per-rank results of the shared world, computed once per pytest process."""
    if "value" not in _cache:
        try:
            with tempfile.TemporaryDirectory(prefix="comm-world-") as tmp:
                _cache["value"] = run_world(_world, WORLD_SIZE, tmp, timeout=180)
        except Exception as e:
            _cache["value"] = e
    value = _cache["value"]
    if isinstance(value, Exception):
        raise value
    return value
