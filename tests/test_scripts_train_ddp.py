"""The project's central oracle: DDP on W ranks with per-rank batch B takes the same steps
as one process with batch W*B (and as W ranks with B/2 and two accumulation micro-steps)."""

import json

import pytest
import torch

import train_ddp
from core.errors import run_cli
from tests.multiproc import PYTHON, run_cmd, run_world
from training.checkpoint import load_checkpoint

# 240 samples at a global batch of 24: 10 steps per epoch, so 12 steps cross an epoch
# boundary (set_epoch reshuffles). 101 eval samples divide by none of 2, 3, 4.
COMMON = [
    "--train-size",
    "240",
    "--eval-size",
    "101",
    "--epochs",
    "2",
    "--max-steps",
    "12",
    "--lr",
    "0.05",
    "--momentum",
    "0.9",
    "--log-every",
    "5",
    "--seed",
    "3",
    "--dtype",
    "float64",  # see TOLERANCE
]


def _train(rank, world_size, out_root, runs):
    """Runs of train_ddp.main inside one spawned world (every rank calls every run)."""
    return {
        name: train_ddp.main([*COMMON, *argv, "--out-dir", f"{out_root}/{name}"])
        for name, argv in runs
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = train_ddp.main([*COMMON, "--batch-size", "24", "--out-dir", str(out)])
    return summary, load_checkpoint(out / "checkpoint.pt")["model"]


# Error model. W ranks with B samples each (or two micro-batches of B/2) sum the same
# float64 per-sample gradients as one process with W x B, in another order: each step's
# update differs by a few units of roundoff (u = 1.1e-16) relative, and after 12 steps the
# parameters (|p| < 1) are at most 2.2e-16 apart (measured under ATEN_CPU_CAPABILITY=default
# and avx2). In float32 a max-pool/ReLU tie resolved the other way after such rounding moved
# a weight by about lr x its gradient (8.3e-5 seen here, from step 6); in float64 a flip
# needs one of the ~1e6 comparisons per step within ~1e-15 (relative) of a tie, a chance of
# about 1e-9 per step. TOLERANCE is 10^5 above the rounding, and real bugs land 10^8 above
# it (injected by hand: every rank drawing rank 0's shard 2.4e-2 to 6.4e-2; the loss of each
# micro-batch not divided by --grad-accum 5.4e-2).
TOLERANCE = 1e-10


def _assert_same_params(state, ref_state):
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        assert state[key].dtype == ref_state[key].dtype == torch.float64, key
        diff = (state[key] - ref_state[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{key} differs by {diff:.3g}"


@pytest.mark.oracle
@pytest.mark.parametrize(
    "world,runs",
    [
        (
            2,
            [
                ("b12", ["--batch-size", "12"]),
                ("accum", ["--batch-size", "6", "--grad-accum", "2"]),
            ],
        ),
        (3, [("b8", ["--batch-size", "8"])]),
        (4, [("b6", ["--batch-size", "6"])]),
    ],
)
def test_ddp_equals_single_process(tmp_path, reference, world, runs):
    ref_summary, ref_state = reference
    per_rank = run_world(_train, world, str(tmp_path), runs, timeout=120)
    for name, _ in runs:
        summaries = [r[name] for r in per_rank]
        # Every replica holds bit-identical parameters after every step.
        assert len({s["param_checksum"] for s in summaries}) == 1
        s = summaries[0]
        assert (s["world_size"], s["steps"], s["global_batch"]) == (world, 12, 24)
        _assert_same_params(load_checkpoint(tmp_path / name / "checkpoint.pt")["model"], ref_state)
        # Exact evaluation: 101 samples counted once each, whatever the world size.
        assert s["eval_samples"] == 101
        # The same parameters up to rounding, the same 101 samples: the same mean loss up
        # to the same rounding (measured: 2.2e-16 relative).
        assert s["eval_loss"] == pytest.approx(ref_summary["eval_loss"], rel=1e-12, abs=0)
        on_disk = json.loads((tmp_path / name / "summary.json").read_text())
        assert on_disk["param_checksum"] == s["param_checksum"]


def _learn(rank, world_size, out):
    return train_ddp.main(
        ["--train-size", "4096", "--eval-size", "1000", "--epochs", "1", "--out-dir", out]
    )


def test_synthetic_default_learns_on_two_ranks(tmp_path):
    s = run_world(_learn, 2, str(tmp_path), timeout=120)[0]
    assert s["eval_samples"] == 1000
    assert s["eval_accuracy"] > 0.6, s  # chance is 0.1
    assert s["final_train_loss"] < 1.5
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--grad-accum", "0"], "argument --grad-accum: must be a positive integer"),
        (["--dataset", "mnist"], "--dataset mnist needs --data-dir"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (
            ["--train-size", "100", "--batch-size", "128"],
            "128 samples per step, but the training set",
        ),
        (
            ["--train-size", "128", "--batch-size", "32", "--grad-accum", "8"],
            "--grad-accum 8 is more than the 4 batches per epoch",
        ),
        (["--resume", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt: no such checkpoint file"),
        (["--amp", "fp16"], "--amp fp16 needs CUDA"),
        (["--sync-bn", "--model", "resnet18"], "--sync-bn needs CUDA"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    assert run_cli(train_ddp.main, [*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_unreadable_checkpoint_from_the_command_line(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    r = run_cmd(
        [PYTHON, "train_ddp.py", "--resume", str(bad), "--out-dir", str(tmp_path)], timeout=60
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: not a readable checkpoint")
    assert not (tmp_path / "summary.json").exists()
