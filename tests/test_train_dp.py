"""train_dp.py and train_ddp.py are one training run, told two ways.

Same seed: `train_dp.py --batch-size 32` in this process and `train_ddp.py --batch-size 16`
on two gloo ranks reach the same parameters (with --grad-accum too), and a checkpoint of
either resumes in the other on the same trajectory. All DDP runs share one spawn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_ddp
import train_dp
from tests.multiproc import run_world
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.models import build_model

SEED = 3
STEPS = 4  # 256 samples, 32 per step: 8 steps per epoch, so resume lands mid-epoch
COMMON = ["--train-size", "256", "--no-eval", "--seed", str(SEED), "--log-every", "100"]


def _args(out: Path, steps: int, batch: int) -> list[str]:
    return [*COMMON, "--out-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch)]


def _ddp_runs(rank: int, world_size: int, tmp: str, dp_half: str) -> dict | None:
    out = Path(tmp)
    runs = {
        "ddp": _args(out / "ddp", STEPS, 16),
        "ddp_accum": [*_args(out / "ddp_accum", STEPS, 16), "--grad-accum", "2"],
        "ddp_from_dp": [*_args(out / "ddp_from_dp", STEPS, 16), "--resume", dp_half],
        "ddp_half": _args(out / "ddp_half", STEPS // 2, 16),
    }
    summaries = {name: train_ddp.main(argv) for name, argv in runs.items()}
    return summaries if rank == 0 else None


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def assert_close(a: dict, b: dict) -> None:
    """Float tolerance: a batch of 32 and two averaged batches of 16 round differently
    (about 3e-8 apart after four steps here)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def one_thread():
    """The DP runs share two cores with the DDP ranks and the rest of the machine; several
    intra-op threads fighting over them run ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dp_and_ddp_are_the_same_run_and_resume_each_other(tmp_path, one_thread):
    dp = train_dp.main(_args(tmp_path / "dp", STEPS, 32))
    dp_accum = train_dp.main([*_args(tmp_path / "dp_accum", STEPS, 32), "--grad-accum", "2"])
    train_dp.main(_args(tmp_path / "dp_half", STEPS // 2, 32))
    (ddp, ddp_accum, ddp_from_dp, ddp_half) = run_world(
        _ddp_runs, 2, str(tmp_path), str(tmp_path / "dp_half" / "checkpoint.pt"), timeout=120
    )[0].values()
    dp_from_ddp = train_dp.main(
        [*_args(tmp_path / "dp_from_ddp", STEPS, 32), "--resume"]
        + [str(tmp_path / "ddp_half" / "checkpoint.pt")]
    )

    straight = weights(tmp_path / "dp")
    torch.manual_seed(SEED)
    init = build_model("cnn", 3, 32, 10).state_dict()
    assert max((straight[k] - init[k]).abs().max() for k in init) > 1e-2  # training moved

    assert_close(weights(tmp_path / "ddp"), straight)
    assert_close(weights(tmp_path / "ddp_accum"), weights(tmp_path / "dp_accum"))
    assert_close(weights(tmp_path / "ddp_from_dp"), straight)
    assert_close(weights(tmp_path / "dp_from_ddp"), straight)
    # 64 samples per step is another trajectory: the tolerance above can tell them apart.
    with pytest.raises(AssertionError):
        assert_close(weights(tmp_path / "dp_accum"), straight)

    # The same summary contract, and the same place in the run.
    for summary in (dp, ddp, ddp_from_dp, dp_from_ddp):
        assert summary["steps"] == STEPS and summary["global_batch"] == 32
    assert dp.keys() - ddp.keys() == {"devices"}
    assert (dp["world_size"], ddp["world_size"]) == (1, 2)
    assert dp["sync"] == "none" and dp["backend"] is None
    assert dp_accum["global_batch"] == ddp_accum["global_batch"] == 64
    assert ddp_half["steps"] == STEPS // 2
    assert dp_from_ddp["samples"] == ddp_from_dp["samples"] == (STEPS // 2) * 32

    # A DDP run that kept the `module.` prefix in its file resumes here all the same...
    state = load_checkpoint(tmp_path / "ddp_half" / "checkpoint.pt")
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    save_checkpoint(tmp_path / "prefixed.pt", state, is_main=True)
    train_dp.main(
        [*_args(tmp_path / "dp_prefixed", STEPS, 32), "--resume", str(tmp_path / "prefixed.pt")]
    )
    assert_close(weights(tmp_path / "dp_prefixed"), straight)
    # ...but not with another number of samples per step: the data order would differ.
    with pytest.raises(CheckpointError, match="32 samples per optimizer step .* this run has 16"):
        train_dp.main(
            [*_args(tmp_path / "bad", STEPS, 16), "--resume", str(tmp_path / "prefixed.pt")]
        )
