"""benchmarks/bench_compile.py's flags: a mode it cannot run is refused at parsing, in one
line, not after torchrun has started its ranks."""

from __future__ import annotations

import pytest

from benchmarks.bench_compile import parse_args
from core.errors import UsageError


def test_hsdp_modes_which_need_a_layout_are_refused_and_the_others_parse():
    for mode in ("hsdp", "torch-hsdp"):
        with pytest.raises(UsageError, match=f"invalid choice: '{mode}'"):
            parse_args(["--modes", "ddp", mode])
    assert parse_args(["--modes", "ddp", "zero3", "fsdp2"]).modes == ["ddp", "zero3", "fsdp2"]
