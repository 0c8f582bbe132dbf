"""--dataset imagefolder and --model package.module:function: a user's own images and network
trained by both scripts with no edit to the repo. The images are PNGs written here; the
network is `tiny_net` below, named on the command line as
tests.test_training_bring_your_own:tiny_net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import train_ddp
import train_dp
from core.errors import run_cli
from data.datasets import build_datasets
from training.checkpoint import load_checkpoint

CLASSES = ("cat", "dog", "emu")  # ImageFolder numbers the class folders in sorted order
SIZE = 8
calls: list[dict] = []  # what tiny_net was asked for, by the scripts in this process


def tiny_net(num_classes: int, in_channels: int) -> nn.Module:
    """A user's factory: takes only the sizes it needs (no image_size)."""
    calls.append({"num_classes": num_classes, "in_channels": in_channels})
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * SIZE * SIZE, num_classes))


def other_names(channels: int, classes: int, depth: int = 2) -> nn.Module:
    """A factory whose required parameters have names that are not FACTORY_ARGS."""
    return nn.Linear(channels, classes)


def not_a_model() -> str:
    return "a string"


def write_folders(root: Path, per_class: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """root/<split>/<class>/<i>.png, random RGB pixels; returns the arrays by split, in the
    order ImageFolder lists them (class folders sorted, files sorted)."""
    rng = np.random.default_rng(0)
    arrays: dict[str, list] = {}
    for split, n in per_class.items():
        arrays[split] = []
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
                arrays[split].append((pixels, label))
    return arrays


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "images"
    return root, write_folders(root, {"train": 8, "val": 3})


@pytest.mark.oracle
def test_imagefolder_reads_the_pixels(folders) -> None:
    """Every sample is its PNG's pixels / 255 as a CHW tensor, with its folder's label."""
    root, arrays = folders
    data = build_datasets("imagefolder", str(root), seed=0)
    assert (data.in_channels, data.image_size, data.num_classes) == (3, SIZE, len(CLASSES))
    for split, ds in (("train", data.train), ("val", data.eval)):
        assert len(ds) == len(arrays[split])
        for (image, label), (pixels, want) in zip(ds, arrays[split], strict=True):
            assert label == want
            expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
            assert torch.equal(image, expected)  # ToTensor: exactly byte / 255 in float32


@pytest.mark.oracle
def test_both_scripts_train_your_data_and_model(folders, tmp_path: Path) -> None:
    """train_dp.py and train_ddp.py (a world of one) train tiny_net on the folders: the
    factory gets the folders' sizes, the checkpoint holds its parameters, every val image
    is evaluated, and the two scripts take the same steps (float64, one process each, the
    same batches: bit-identical, as DDP over one rank averages over one)."""
    root, arrays = folders
    calls.clear()
    flags = [
        "--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "2",
        "--model", "tests.test_training_bring_your_own:tiny_net", "--dtype", "float64",
        "--batch-size", "4",
    ]  # fmt: skip
    dp = train_dp.main([*flags, "--out-dir", str(tmp_path / "dp")])
    ddp = train_ddp.main([*flags, "--out-dir", str(tmp_path / "ddp")])
    assert calls == [{"num_classes": 3, "in_channels": 3}] * 2
    assert dp["eval_samples"] == ddp["eval_samples"] == len(arrays["val"])
    assert dp["steps"] == ddp["steps"] == 2 * len(arrays["train"]) // 4
    assert dp["param_checksum"] == ddp["param_checksum"]
    saved = load_checkpoint(tmp_path / "dp" / "checkpoint.pt")["model"]
    assert {k: v.shape for k, v in saved.items()} == {
        "1.weight": (3, 3 * SIZE * SIZE),
        "1.bias": (3,),
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "tests.no_such_module:f"], "error: --model tests.no_such_module:f: cannot "),
        (["--model", "tests.test_training_bring_your_own:nothing"], "has no function nothing"),
        (
            ["--model", "tests.test_training_bring_your_own:not_a_model"],
            "returned a str, not an nn.",
        ),
        (["--model", "resnet"], "error: argument --model: expected one of mlp, cnn, resnet18"),
        (  # once a 31-line TypeError from inside build_custom
            ["--model", "tests.test_training_bring_your_own:other_names"],
            "other_names() needs channels, classes, but is called with keywords only",
        ),
    ],
)
def test_bad_model(folders, tmp_path, capsys, flags, message) -> None:
    root, _ = folders
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--batch-size", "4"]
    argv += ["--out-dir", str(tmp_path / "o")]
    assert run_cli(train_dp.main, [*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_folders(tmp_path: Path, capsys) -> None:
    """No val/, or other classes in val/ than in train/: one line saying what is expected."""
    root = tmp_path / "images"
    write_folders(root, {"train": 2})
    argv = ["--dataset", "imagefolder", "--data-dir", str(root), "--out-dir", str(tmp_path / "o")]
    assert run_cli(train_dp.main, argv) == 2
    assert "has no val/ folder: --dataset imagefolder expects" in capsys.readouterr().err
    (root / "val" / "cow").mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE)).save(root / "val" / "cow" / "0.png")
    assert run_cli(train_dp.main, argv) == 2
    assert "both need the same class folders" in capsys.readouterr().err
