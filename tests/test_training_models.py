import pytest
import torch

import train_ddp
from training.models import MODELS, build_model, has_batchnorm


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_model_fits_every_dataset_shape(name, channels, size):
    model = build_model(name, channels, size, 10)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    # Only resnet18 has BatchNorm: the default models compute the same function whatever
    # the per-rank batch size, which the DDP == single-process oracle relies on.
    assert has_batchnorm(model) == (name == "resnet18")


def test_bf16_autocast_and_loader_workers_train(tmp_path):
    s = train_ddp.main(
        [
            "--amp",
            "bf16",
            "--workers",
            "2",
            "--train-size",
            "256",
            "--eval-size",
            "50",
            "--batch-size",
            "32",
            "--max-steps",
            "4",
            "--model",
            "mlp",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert s["steps"] == 4 and s["eval_samples"] == 50
    assert 0 < s["final_train_loss"] < 10
