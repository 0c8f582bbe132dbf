"""The models: small enough to train on CPU processes in seconds, real enough to show the
mechanics. The default `cnn` has no dropout and no BatchNorm, so a DDP run and a
single-process run with the same global batch compute the same function step for step.
`gpt` (training/gpt.py) is the language model for the text datasets (data/text.py)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

import torch
import torch.nn as nn

from core.errors import UsageError
from training.gpt import GPT

MODELS = ("mlp", "cnn", "resnet18")  # image classifiers
TEXT_MODELS = ("gpt",)  # language models over bytes, for data/text.py's datasets
# What a factory named by --model package.module:function may ask for, by parameter name.
FACTORY_ARGS = ("in_channels", "image_size", "num_classes")


def model_name(value: str) -> str:
    """--model: one of MODELS or TEXT_MODELS, or `package.module:function` (checked when it
    is built)."""
    module, _, function = value.partition(":")
    if value in MODELS + TEXT_MODELS or (module and function.isidentifier()):
        return value
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(MODELS + TEXT_MODELS)} or package.module:function, "
        f"got {value!r}"
    )


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
    model = factory(**{k: v for k, v in sizes.items() if takes_all or k in params})
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """One of MODELS or TEXT_MODELS, or the nn.Module a `package.module:function` factory
    returns."""
    if ":" in name:
        return build_custom(
            name, in_channels=in_channels, image_size=image_size, num_classes=num_classes
        )
    if name == "gpt":  # image_size: the context; num_classes: the vocabulary
        return GPT(vocab=num_classes, context=image_size)
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
        f"unknown model {name!r}; choose one of {', '.join(MODELS + TEXT_MODELS)} or "
        "package.module:function"
    )


def model_from_args(args: argparse.Namespace, data) -> nn.Module:
    """--model for the data of `data` (a data.datasets.DataSpec): gpt takes its sizes from
    --gpt-layers, --gpt-width, --gpt-heads and --context, the others from the data."""
    if args.model == "gpt":
        return GPT(data.num_classes, args.context, args.gpt_layers, args.gpt_width, args.gpt_heads)
    return build_model(args.model, data.in_channels, data.image_size, data.num_classes)


def model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch on `device`, floating point ones (images) cast to `dtype`; integer ones (byte
    ids, which nn.Embedding needs as integers) keep theirs."""
    return x.to(device, dtype if x.is_floating_point() else None, non_blocking=True)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
