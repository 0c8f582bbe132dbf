"""The models: small enough to train on CPU processes in seconds, real enough to show the
mechanics. The default `cnn` has no dropout and no BatchNorm, so a DDP run and a
single-process run with the same global batch compute the same function step for step."""

from __future__ import annotations

import torch.nn as nn

from comm.dist import UsageError

MODELS = ("mlp", "cnn", "resnet18")


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(weights=None, num_classes=num_classes)
        if image_size <= 64:
            # The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to
            # 8x8 before the first block; small images get the usual 3x3 stride-1 stem.
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        return model
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
