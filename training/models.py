"""The models: small enough to train on CPU processes in seconds, real enough to show the
mechanics. The default `cnn` has no dropout and no BatchNorm, so a DDP run and a
single-process run with the same global batch compute the same function step for step."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from core.errors import UsageError
from training.cli import FACTORY_ARGS, MODELS  # the flags' choices, defined without torch


def import_factory(spec: str):
    """The function `package.module:function` names, imported from the current directory or
    PYTHONPATH. (`python train_dp.py` puts the script's folder on sys.path, not the folder
    you run it from; that one is added here.)"""
    module_name, _, function = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--model {spec}: cannot import {module_name}: {e}") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UsageError(f"--model {spec}: {module_name} has no function {function}")
    return factory


def build_custom(spec: str, **sizes: int) -> nn.Module:
    """Call the factory with those of in_channels, image_size and num_classes that its
    signature names (all of them if it takes **kwargs)."""
    factory = import_factory(spec)
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    positional_only = inspect.Parameter.POSITIONAL_ONLY
    unknown = [  # what the call below could not fill: a TypeError from deep in the caller
        name
        for name, p in params.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and (name not in FACTORY_ARGS or p.kind is positional_only)
    ]
    if unknown:
        raise UsageError(
            f"--model {spec}: {factory.__name__}() needs {', '.join(unknown)}, but is called "
            f"with keywords only, those of {', '.join(FACTORY_ARGS)} it names: rename them, "
            "or give them defaults"
        )
    model = factory(**{k: v for k, v in sizes.items() if takes_all or k in params})
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """One of MODELS, or the nn.Module a `package.module:function` factory returns."""
    if ":" in name:
        return build_custom(
            name, in_channels=in_channels, image_size=image_size, num_classes=num_classes
        )
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
    raise UsageError(
        f"unknown model {name!r}; choose one of {', '.join(MODELS)} or package.module:function"
    )


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _UnderAutocast:
    """A replica called under the caller's autocast (device type and dtype), in whichever
    thread calls it."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


def under_callers_autocast(replicas: Sequence[nn.Module], device_type: str) -> list:
    """The replicas, each made to compute under the autocast that the calling thread has
    on for `device_type`, dtype included; unchanged where it has none. Call it in the
    thread that entered autocast."""
    if not torch.is_autocast_enabled(device_type):
        return list(replicas)
    dtype = torch.get_autocast_dtype(device_type)
    return [_UnderAutocast(replica, device_type, dtype) for replica in replicas]


class DataParallel(nn.DataParallel):
    """nn.DataParallel whose replicas compute in the autocast dtype of the caller.

    torch's parallel_apply (torch/nn/parallel/parallel_apply.py, 2.11 to 2.14) runs each
    replica in a thread of its own and re-enters autocast there with `enabled` only; the
    dtype is per thread, so every replica falls back to the device's default, float16 on
    CUDA: under `--amp bf16` the replicas would compute in float16, with no loss scaler
    (GradScaler is on for fp16 only). Here each replica enters autocast again, inside the
    worker's, with the dtype the caller chose. The module, its state_dict and its
    checkpoints are nn.DataParallel's."""

    def parallel_apply(self, replicas, inputs, kwargs):  # noqa: ANN001, ANN201 (torch's)
        replicas = under_callers_autocast(replicas, self.src_device_obj.type)
        return super().parallel_apply(replicas, inputs, kwargs)
