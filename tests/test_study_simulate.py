"""study/simulate.py: one process plays one rank of a W-rank job on torch's fake process
group; what it counts (storages, traced collectives) equals the formulas of
parallel/memory.py exactly, for every mode at W = 8, 64 and 1024.

Bytes held are integers and must be equal. Bytes sent are the ring model's (W-1)/W x
payload summed over the step's collectives in float64: equal to the formula up to the
rounding of that sum (~1e-16 relative per term, a few hundred terms), so 1e-12 relative.
All cases run in one subprocess: the fake group must not meet this process's own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from core.errors import UsageError
from parallel.memory import KINDS, SIMULATED_MODES
from study.simulate import parse_args
from tests.multiproc import ROOT
from training.models import build_model

WORLDS = (8, 64, 1024)
# hsdp and torch-hsdp on nodes of 8 ranks but at W = 8, where that is zero3: 2 nodes of 4.
PER_NODE = {8: 4, 64: 8, 1024: 8}
SCRIPT = f"""
import json, sys
from study.simulate import parse_args, simulate
model, worlds = sys.argv[1], sys.argv[2:]
for mode in {SIMULATED_MODES!r}:
    for world in worlds:
        g = {PER_NODE!r}[int(world)]
        layout = ["--topology", f"{{int(world) // g}}x{{g}}"] if "hsdp" in mode else []
        argv = ["--world", world, "--sync", mode, "--model", model, *layout]
        print(json.dumps(simulate(parse_args(argv))), flush=True)
"""


def simulated(model: str, worlds: tuple[int, ...]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, model, *map(str, worlds)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(SIMULATED_MODES) * len(worlds)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return simulated("cnn", WORLDS)


def assert_counts_are_the_formulas(rows: list[dict]) -> None:
    for row in rows:
        case = (row["sync"], row["model"], row["world"])
        for kind in KINDS:
            assert row[f"{kind}_bytes"] == row[f"formula_{kind}_bytes"], (case, kind)
        sent, formula = row["bytes_sent_per_rank"], row["formula_bytes_sent_per_rank"]
        assert sent > 0 and abs(sent - formula) <= 1e-12 * formula, (case, sent, formula)


@pytest.mark.oracle
def test_counted_bytes_equal_the_formulas(rows):
    assert_counts_are_the_formulas(rows)


@pytest.mark.slow
@pytest.mark.oracle
def test_counted_bytes_equal_the_formulas_with_buffers_and_many_units():
    """resnet18: BatchNorm buffers (broadcast by the hand-made modes) and 60 units."""
    assert_counts_are_the_formulas(simulated("resnet18", (64,)))


def test_hsdp_holds_a_node_s_share_and_sends_less_across_nodes(rows):
    """hsdp at 1024 = 128 x 8 holds what zero3 holds at W = 8 (1/8 of ddp, padding aside),
    128 times zero3's at 1024; each unit's slice crosses the network once (2(N-1)/N x P/G),
    and the whole step sends less than zero3's 3 (W-1)/W x P."""
    at = {r["sync"]: r for r in rows if r["world"] == 1024}
    eight = {r["sync"]: r for r in rows if r["world"] == 8}
    ddp, zero3, hsdp = at["ddp"], at["zero3"], at["hsdp"]
    padding = 8 * hsdp["params_bytes"] - ddp["params_bytes"]  # G x the slices, less P
    assert 0 <= padding <= 7 * 4 * 4  # at most G - 1 float32 elements for each of 4 units
    assert hsdp["params_bytes"] > 100 * zero3["params_bytes"]
    assert hsdp["bytes_sent_per_rank"] < zero3["bytes_sent_per_rank"]
    assert eight["hsdp"]["topology"] == "2x4" and hsdp["topology"] == "128x8"
    # Across nodes: each unit's padded slice of ceil(P_u / 8) float32 elements, all-reduced
    # over the 128 nodes (2 x 127/128 of it sent); zero3's whole step runs on the world.
    torch.manual_seed(0)
    model = build_model("cnn", 3, 32, 10)
    units = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    slices = sum(-(-u // 8) for u in units if u)
    across = hsdp["bytes_sent_per_group"]["inter-node"]
    assert abs(across - 2 * 127 / 128 * slices * 4) <= 1e-12 * across
    assert set(zero3["bytes_sent_per_group"]) == {"world"}


def test_sharding_shrinks_what_a_rank_holds(rows):
    """The point of the modes, as a sanity check on the counts: at 1024 ranks zero3 and fsdp2
    hold a sliver of what ddp holds, zero2 drops the gradients, zero1 the optimizer state."""
    at = {(r["sync"], r["model"]): r for r in rows if r["world"] == 1024}
    ddp = at["ddp", "cnn"]
    assert at["zero1", "cnn"]["optimizer_bytes"] * 500 < ddp["optimizer_bytes"]
    assert at["zero2", "cnn"]["grads_bytes"] * 500 < ddp["grads_bytes"]
    for mode in ("zero3", "fsdp2"):
        assert at[mode, "cnn"]["params_bytes"] * 50 < ddp["params_bytes"]


def test_usage_errors_are_one_line():
    """Refused at parse time, before any process group (run_cli makes each one line)."""
    for argv, says in [
        (["--world", "1", "--sync", "ddp"], "--world must be 2 to"),
        (["--world", "8", "--sync", "zero3", "--rank", "8"], "not a rank of a world of 8"),
        (["--world", "8", "--sync", "ring"], "invalid choice: 'ring'"),
        (["--world", "8", "--sync", "hsdp"], "--sync hsdp needs --topology NODESxPER_NODE"),
        (["--world", "8", "--sync", "torch-hsdp", "--topology", "2x2"], "2 x 2 = 4 ranks"),
        (["--world", "8", "--sync", "zero3", "--topology", "2x4"], "--topology applies to"),
    ]:
        with pytest.raises(UsageError, match=re.escape(says)):
            parse_args(argv)
