"""Sharded checkpoints (training/sharded.py) and their conversion (tools/convert.py).

A 2-rank world trains `--sync ddp` and each sharded mode straight for 8 AdamW steps in
float64, saving at step 4 (mid-epoch) and 8. A 4-rank world and a 1-rank world resume every
sharded mode from its step-4 checkpoint with the same 16 samples per step (4 x 4, 16 x 1).
The oracle: every run ends at `--sync ddp`'s parameters (read back by converting its last
checkpoint to the single-file format); train_dp.py resumed from a converted step-4
checkpoint too. Then a rank SIGKILLed inside a sharded save must leave the previous
checkpoint as the newest, and bad checkpoints are refused in one line; hostile ones (a payload
in any file of the folder, the sha256 list refreshed) too, with the payload proved live and
left unrun (tests/hostile.py).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import train_ddp
import train_dp
from core.errors import run_cli
from tests import hostile
from tests.multiproc import WorldFailed, run_world
from tools import convert
from training.checkpoint import load_checkpoint
from training.models import build_model

MODES = ("zero1", "zero2", "zero3", "torch-zero1", "fsdp2")
COMMON = [
    "--train-size", "256", "--eval-size", "16", "--epochs", "1", "--max-steps", "8",
    "--no-eval", "--log-every", "1000", "--dtype", "float64", "--optimizer", "adamw",
    "--lr", "0.002", "--warmup-steps", "20",
]  # fmt: skip
PER_RANK = {1: 16, 2: 8, 4: 4}  # 16 samples per optimizer step at every world size


def flags(world_size: int, out: Path, *more: str) -> list[str]:
    return [*COMMON, "--batch-size", str(PER_RANK[world_size]), "--out-dir", str(out), *more]


def straight(rank: int, world_size: int, root: str, modes: tuple[str, ...]) -> None:
    root = Path(root)
    for mode in ("ddp", *modes):
        train_ddp.main(flags(world_size, root / f"w2-{mode}", "--sync", mode, "--save-every", "4"))


def resumed(rank: int, world_size: int, root: str, modes: tuple[str, ...]) -> None:
    root = Path(root)
    for mode in modes:
        step4 = root / f"w2-{mode}" / "checkpoints" / "step-00000004.dcp"
        out = root / f"w{world_size}-{mode}"
        train_ddp.main(flags(world_size, out, "--sync", mode, "--resume", str(step4)))


def killed_in_save(rank: int, world_size: int, root: str) -> None:
    """Rank 1 dies inside the step-8 save, once it has written its own file."""
    write = dcp.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        result = write(self, plan, planner)
        if rank == 1 and "step-00000008" in str(self.path):
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp.FileSystemWriter.write_data = write_then_die
    train_ddp.main(flags(world_size, Path(root) / "killed", "--sync", "zero2", "--save-every", "4"))


def resume_auto(rank: int, world_size: int, out: str) -> None:
    train_ddp.main(flags(world_size, Path(out), "--sync", "zero2", "--resume", "auto"))


def final_model(out: Path, tmp: Path) -> dict:
    target = tmp / f"{out.name}.pt"
    convert.main([str(out / "checkpoint.dcp"), str(target)])
    return load_checkpoint(target)["model"]


# Error model: as tests/test_parallel_zero.py's. Every mode and world size averages the same float64
# gradients in another order (W = 1, 2, 4; flat, per unit, per bucket), 8 AdamW steps: a few
# units of roundoff (1.1e-16) per step, amplified at most ~1x per step by AdamW's division by
# sqrt(v). Measured over all five modes at W = 2, 4 and 1: at most 2.8e-17 under
# ATEN_CPU_CAPABILITY=default, 1.4e-17 under avx2. A resume that loses the optimizer state, the
# learning rate the schedule had reached or a batch moves the parameters by ~lr = 2e-3 (the
# learning rate left at its initial warm-up value, a bug this test caught: 2.0e-3).
TOLERANCE = 1e-10


# zero3 (the mode that shards everything) in the default suite, the other four with `slow`.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("zero3",), id="zero3"),
        pytest.param(
            ("zero1", "zero2", "torch-zero1", "fsdp2"), id="others", marks=pytest.mark.slow
        ),
    ],
)
def runs(request, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    root, modes = tmp_path_factory.mktemp("sharded"), request.param
    run_world(straight, 2, str(root), modes, timeout=180)
    run_world(resumed, 4, str(root), modes, timeout=180)
    run_world(resumed, 1, str(root), modes, timeout=180)
    return root, modes


@pytest.mark.oracle
def test_sharded_resume_at_other_world_sizes_ends_at_ddps_parameters(runs, tmp_path):
    runs, modes = runs
    ddp = load_checkpoint(runs / "w2-ddp" / "checkpoint.pt")["model"]
    torch.manual_seed(0)
    initial = build_model("cnn", 3, 32, 10).state_dict()
    assert max((ddp[k] - v).abs().max().item() for k, v in initial.items()) > 1e-3
    for mode in modes:
        for world_size in (2, 4, 1):
            out = runs / f"w{world_size}-{mode}"
            model = final_model(out, tmp_path)
            assert model.keys() == ddp.keys()
            diff = max((model[k] - ddp[k]).abs().max().item() for k in ddp)
            assert diff <= TOLERANCE, f"{mode} at W={world_size}: {diff:.3g}"
            assert os.readlink(out / "checkpoint.dcp") == "checkpoints/step-00000008.dcp"


@pytest.mark.oracle
def test_a_converted_checkpoint_resumes_in_train_dp(runs, tmp_path):
    runs, modes = runs
    ddp = load_checkpoint(runs / "w2-ddp" / "checkpoint.pt")["model"]
    for mode in modes:
        step4 = tmp_path / f"{mode}-step4.pt"
        src = runs / f"w2-{mode}" / "checkpoints" / "step-00000004.dcp"
        assert run_cli(convert.main, [str(src), str(step4)]) == 0
        out = tmp_path / f"dp-{mode}"
        dp_flags = [*COMMON, "--batch-size", "16", "--out-dir", str(out), "--gpus", "none"]
        train_dp.main([*dp_flags, "--resume", str(step4)])
        model = load_checkpoint(out / "checkpoint.pt")["model"]
        diff = max((model[k] - ddp[k]).abs().max().item() for k in ddp)
        assert diff <= TOLERANCE, f"{mode}: {diff:.3g}"


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path, capsys):
    with pytest.raises(WorldFailed, match="rank 1 died with exit code -9"):
        run_world(killed_in_save, 2, str(tmp_path), timeout=120)
    out = tmp_path / "killed"
    assert os.readlink(out / "checkpoint.dcp") == "checkpoints/step-00000004.dcp"
    assert (out / "checkpoints" / ".step-00000008.dcp.tmp").is_dir()  # never renamed
    assert not (out / "checkpoints" / "step-00000008.dcp").exists()
    # --resume auto takes step 4 and finishes; the next save removes the leftover folder.
    run_world(resume_auto, 2, str(out), timeout=120)
    assert os.readlink(out / "checkpoint.dcp") == "checkpoints/step-00000008.dcp"
    assert not (out / "checkpoints" / ".step-00000008.dcp.tmp").exists()


def _bad(kind: str, good: Path, bad: Path) -> None:
    shutil.copytree(good, bad)
    if kind == "corrupt shard":
        data = bytearray((bad / "__0_0.distcp").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "__0_0.distcp").write_bytes(bytes(data))
    elif kind == "missing shard":
        (bad / "__0_0.distcp").unlink()
    elif kind == "foreign":
        (bad / "train_state.pt").unlink()
    elif kind == "truncated state":
        (bad / "train_state.pt").write_bytes((bad / "train_state.pt").read_bytes()[:100])


BAD = {
    "corrupt shard": "__0_0.distcp is corrupt (its sha256 differs)",
    "missing shard": "__0_0.distcp is missing",
    "foreign": "not a sharded checkpoint of this project (no train_state.pt)",
    "truncated state": "not a readable checkpoint (truncated",
    "single file": "a single-file checkpoint; the sharded --sync modes resume from a "
    "checkpoint folder",
    "other mode": "written with --sync zero1 (this run: zero3)",
}


@pytest.fixture(scope="module")
def one_rank_zero1(tmp_path_factory) -> tuple[Path, Path]:
    """A world of one in this process: a zero1 checkpoint, and its single-file conversion."""
    root = tmp_path_factory.mktemp("one-rank")
    train_ddp.main(flags(1, root, "--sync", "zero1", "--max-steps", "2"))
    single = root / "single.pt"
    convert.main([str(root / "checkpoint.dcp"), str(single)])
    return root / "checkpoints" / "step-00000002.dcp", single


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_sharded_checkpoint_is_refused_in_one_line(one_rank_zero1, tmp_path, capsys, kind):
    good, single = one_rank_zero1
    bad = tmp_path / "bad.dcp"
    if kind == "single file":
        bad = single
    else:
        _bad(kind, good, bad)
    mode = "zero3" if kind == "other mode" else "zero1"
    out = tmp_path / "out"
    capsys.readouterr()
    code = run_cli(train_ddp.main, [*flags(1, out, "--sync", mode), "--resume", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert BAD[kind] in err, err
    assert not (out / "checkpoints").exists()  # nothing written
    if kind not in ("other mode", "single file"):  # the converter reads the same checks
        target = tmp_path / "full.pt"
        assert run_cli(convert.main, [str(bad), str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and BAD[kind] in err, err
        assert not target.exists()


# ---- hostile folders: nothing in a checkpoint folder runs code, even re-signed


@pytest.mark.parametrize("kind", hostile.KINDS)
def test_a_hostile_resigned_folder_runs_nothing_on_resume_or_convert(
    one_rank_zero1, tmp_path, capsys, kind
):
    good, _ = one_rank_zero1
    bad, marker = tmp_path / "bad.dcp", tmp_path / "marker"
    hostile.make_hostile(kind, good, bad, marker)
    assert hostile.payload_runs(kind, bad, marker)  # live: a plain unpickler runs it
    out, target = tmp_path / "out", tmp_path / "full.pt"
    capsys.readouterr()
    codes = [
        run_cli(train_ddp.main, [*flags(1, out, "--sync", "zero1"), "--resume", str(bad)]),
        run_cli(convert.main, [str(bad), str(target)]),
    ]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert codes == [2, 2] and len(lines) == 2, (codes, err)
    for line in lines:  # refused by the allow-lists, not by a later check
        assert line.startswith("error: ") and "nothing was run" in line, err
        assert "io.open" in line and "weights_only" not in line, err
    assert not marker.exists()  # inert
    assert not (out / "checkpoints").exists() and not target.exists()


def _metadata_bomb(kind: str, metadata) -> None:
    fqn, md = next((k, v) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks"))
    if kind == "declared size":  # 10^12 elements: a loader allocates what is declared
        md.size = torch.Size([10**12])
        md.chunks[0].sizes = torch.Size([10**12])
    elif kind == "list index":  # DCP pads a list up to each index it rebuilds
        metadata.planner_data[fqn] = ("flat", 10**12)
    elif kind == "outside the folder":
        for info in metadata.storage_data.values():
            info.relative_path = "../../etc/passwd"
    else:  # "past its file": an offset beyond the end of the shard
        for info in metadata.storage_data.values():
            info.offset += 10**9


@pytest.mark.parametrize(
    "kind", ["declared size", "list index", "outside the folder", "past its file"]
)
def test_metadata_that_declares_more_than_its_folder_holds_is_refused(
    one_rank_zero1, tmp_path, capsys, kind
):
    """Each of these, re-signed, would make DCP allocate or read what the folder does not
    hold; refused before any of it, in one line, by the resume and the converter alike."""
    good, _ = one_rank_zero1
    bad = tmp_path / "bad.dcp"
    shutil.copytree(good, bad)
    with open(bad / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own, trusted copy
    _metadata_bomb(kind, metadata)
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    hostile._sign(bad)
    out, target = tmp_path / "out", tmp_path / "full.pt"
    capsys.readouterr()
    codes = [
        run_cli(train_ddp.main, [*flags(1, out, "--sync", "zero1"), "--resume", str(bad)]),
        run_cli(convert.main, [str(bad), str(target)]),
    ]
    lines = capsys.readouterr().err.splitlines()
    assert codes == [2, 2] and len(lines) == 2, (codes, lines)
    assert all(line.startswith("error: ") and "malformed DCP metadata" in line for line in lines)
    assert not (out / "checkpoints").exists() and not target.exists()
