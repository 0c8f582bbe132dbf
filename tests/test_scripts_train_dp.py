"""train_dp.py and train_ddp.py are one training run, told two ways.

Same seed: `train_dp.py --batch-size 32` in this process and `train_ddp.py --batch-size 16`
on two gloo ranks reach the same parameters (with --grad-accum too; in float64, up to
rounding: see TOLERANCE), and a checkpoint of either resumes in the other on the same
trajectory. All DDP runs share one spawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_ddp
import train_dp
from core.errors import run_cli
from tests.multiproc import PYTHON, gpu_count, run_cmd, run_world
from training.checkpoint import CheckpointError, load_checkpoint, write_checkpoint
from training.models import build_model

SEED = 3
STEPS = 6  # 256 samples, 32 per step: 8 steps per epoch, so every hand-over is mid-epoch
COMMON = [
    "--train-size", "256", "--eval-size", "32", "--no-eval", "--seed", str(SEED),
    "--dtype", "float64",  # see TOLERANCE
]  # fmt: skip


def _args(out: Path, steps: int, batch: int) -> list[str]:
    return [*COMMON, "--out-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch)]


def _ddp_runs(rank: int, world_size: int, tmp: str) -> dict | None:
    out = Path(tmp)
    runs = {
        "ddp": _args(out / "ddp", STEPS, 16),
        "ddp_accum": [*_args(out / "ddp_accum", 2, 16), "--grad-accum", "2"],
        # steps 2 to 4 of the relay DP -> DDP -> DP
        "relay_ddp": [*_args(out / "relay_ddp", 4, 16), "--resume", str(out / "relay_dp")],
    }
    runs["relay_ddp"][-1] += "/checkpoint.pt"
    summaries = {name: train_ddp.main(argv) for name, argv in runs.items()}
    return summaries if rank == 0 else None


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Error model. A batch of 32 and two averaged batches of 16 sum the same float64 per-sample
# gradients in another order: each step's update differs by a few units of roundoff
# (u = 1.1e-16) relative, and after 6 steps the parameters (|p| < 1) are at most 8.3e-17
# apart (measured under ATEN_CPU_CAPABILITY=default and avx2). In float32 such differences
# (~3e-8) once in a while resolved a max-pool between two nearly equal inputs the other
# way, which moves a first-layer weight by about lr x gradient (6e-6 seen); in float64 that
# needs one of the ~1e6 comparisons per step within ~1e-15 (relative) of a tie, a chance of
# about 1e-9 per step. TOLERANCE is 10^6 above the rounding; another batch in a step moves
# the parameters by 1e-2 after two steps (checked below), as do the bugs injected by hand
# into train_ddp.py for tests/test_scripts_train_ddp.py (2e-2 and more).
TOLERANCE = 1e-10


@pytest.mark.oracle
def test_dp_and_ddp_are_the_same_run_and_resume_each_other(tmp_path, capsys):
    dp = train_dp.main(_args(tmp_path / "dp", STEPS, 32))
    note = "no GPU: training the plain module on the CPU (DataParallel needs GPUs)\n"
    assert capsys.readouterr().out.count(note) == 1  # the tests see no GPU (conftest.py)
    dp_accum = train_dp.main([*_args(tmp_path / "dp_accum", 2, 32), "--grad-accum", "2"])
    train_dp.main(_args(tmp_path / "relay_dp", 2, 32))  # the relay's first leg
    ddp, ddp_accum, relay_ddp = run_world(_ddp_runs, 2, str(tmp_path), timeout=120)[0].values()
    # The last leg resumes a DDP checkpoint rewritten as a script that saved the DDP
    # model's own state_dict() would have written it: every key starts with `module.`.
    state = load_checkpoint(tmp_path / "relay_ddp" / "checkpoint.pt")
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    write_checkpoint(tmp_path / "prefixed.pt", state)
    relay = train_dp.main(
        [*_args(tmp_path / "relay", STEPS, 32), "--resume", str(tmp_path / "prefixed.pt")]
    )

    straight = weights(tmp_path / "dp")
    torch.manual_seed(SEED)
    init = build_model("cnn", 3, 32, 10).state_dict()
    assert max_diff(straight, init) > 1e-2  # training moved

    assert max_diff(weights(tmp_path / "ddp"), straight) < TOLERANCE
    assert max_diff(weights(tmp_path / "ddp_accum"), weights(tmp_path / "dp_accum")) < TOLERANCE
    assert max_diff(weights(tmp_path / "relay"), straight) < TOLERANCE
    # 64 samples per step is another trajectory, far outside the tolerance.
    assert max_diff(weights(tmp_path / "dp_accum"), weights(tmp_path / "relay_dp")) > 1e-3

    # The same summary contract, and each leg of the relay took over where the last one was.
    assert dp.keys() - ddp.keys() == {"devices"}
    assert (dp["world_size"], ddp["world_size"]) == (1, 2)
    assert dp["sync"] == "none" and dp["backend"] is None
    assert dp["global_batch"] == ddp["global_batch"] == 32
    assert dp_accum["global_batch"] == ddp_accum["global_batch"] == 64
    assert (dp["steps"], ddp["steps"], relay_ddp["steps"], relay["steps"]) == (6, 6, 4, 6)
    assert (relay_ddp["samples"], relay["samples"]) == (2 * 32, 2 * 32)

    # Another number of samples per step would draw other batches: refused.
    with pytest.raises(CheckpointError, match="32 samples per optimizer step .* this run has 16"):
        train_dp.main(
            [*_args(tmp_path / "bad", STEPS, 16), "--resume", str(tmp_path / "prefixed.pt")]
        )


def test_usage_errors_are_one_line(capsys, monkeypatch, tmp_path):
    assert run_cli(train_dp.main, ["--gpus", "99"]) == 2
    assert capsys.readouterr().err == (
        "error: --gpus asks for cuda:99 but 0 CUDA device(s) are visible\n"  # conftest.py
    )
    assert run_cli(train_dp.main, ["--gpus", "0,0"]) == 2
    assert "indices must be distinct" in capsys.readouterr().err
    out = tmp_path / "traced"  # DataParallel runs no torch.distributed collective to trace
    assert run_cli(train_dp.main, ["--trace-comm", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --trace-comm records torch.distributed collectives")
    assert err.count("\n") == 1 and not out.exists()  # one line, nothing written
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by torchrun: the wrong script
    assert run_cli(train_dp.main, []) == 2
    assert "under torchrun use train_ddp.py" in capsys.readouterr().err


@pytest.mark.gpu(1)
def test_dp_runs_on_every_gpu_and_says_how(tmp_path):
    # A child that sees the GPUs: this process sees none.
    out = run_cmd(
        [PYTHON, "train_dp.py", *_args(tmp_path, STEPS, 32)], gpus=True, check=True, timeout=180
    ).stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    n = gpu_count()
    assert summary["devices"] == [f"cuda:{i}" for i in range(n)]
    if n == 1:
        assert summary["sync"] == "none"
        assert "one GPU: no DataParallel wrapper" in out
    else:
        assert summary["sync"] == "dataparallel"
        assert f"nn.DataParallel over {n} GPUs, outputs gathered on cuda:0" in out
    assert load_checkpoint(tmp_path / "checkpoint.pt")["model"]["0.weight"].device.type == "cpu"


@pytest.mark.slow
def test_benchmark_writes_table_csv_and_plot(tmp_path):
    argv = ["-m", "benchmarks.bench_dp_ddp", "--steps", "2", "--warmup", "1"]
    argv += ["--global-batch", "8", "--model", "mlp", "--out-dir", str(tmp_path)]
    result = run_cmd([PYTHON, *argv], timeout=180, check=True)
    assert "ddp (gloo)" in result.stdout or "ddp (nccl)" in result.stdout
    rows = (tmp_path / "dp_vs_ddp.csv").read_text().splitlines()
    assert rows[0].startswith("mode,processes,threads_per_process") and len(rows) >= 3
    assert (tmp_path / "dp_vs_ddp.png").read_bytes()[:4] == b"\x89PNG"
