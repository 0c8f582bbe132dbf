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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from core.errors import UsageError
from training.cli import (  # the flags' choices, defined without torch
    FACTORY_ARGS,
    MODELS,
    TEXT_MODELS,
)
from training.gpt import GPT


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
    --gpt-layers, --gpt-width, --gpt-heads and --context, the others from the data. Refuses
    train_ddp.py's --sync-bn for a model without a BatchNorm layer to convert."""
    if args.model == "gpt":
        model = GPT(data.num_classes, args.context, args.gpt_layers, args.gpt_width, args.gpt_heads)
    else:
        model = build_model(args.model, data.in_channels, data.image_size, data.num_classes)
    if getattr(args, "sync_bn", False) and not has_batchnorm(model):
        raise UsageError(f"--sync-bn: model {args.model} has no BatchNorm layer")
    return model


def model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch on `device`, floating point ones (images) cast to `dtype`; integer ones (byte
    ids, which nn.Embedding needs as integers) keep theirs."""
    return x.to(device, dtype if x.is_floating_point() else None, non_blocking=True)


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


def blocks_of(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks --activation-checkpointing recomputes, each a run of modules called in
    turn. A model that lists its own (`model.blocks`, as --model gpt) gives them; an
    nn.Sequential is cut before each child that owns parameters, so that a block is a layer
    with the activations and pooling after it (a lone ReLU or max-pool gains nothing from
    recomputation: checkpointed alone, it keeps its input instead of its output); any other
    model (resnet18) checkpoints those of its top-level children that own parameters, which
    its forward calls one by one (a lone in-place ReLU cannot be: it overwrites the input
    the checkpoint keeps)."""
    if isinstance(getattr(model, "blocks", None), nn.ModuleList | nn.Sequential | list):
        return [[block] for block in model.blocks]
    if isinstance(model, nn.Sequential):
        runs: list[list[nn.Module]] = []
        for child in model:
            owns = any(True for _ in child.parameters())
            if not runs or (owns and any(any(True for _ in m.parameters()) for m in runs[-1])):
                runs.append([child])
            else:
                runs[-1].append(child)
        return runs
    return [[child] for child in model.children() if any(True for _ in child.parameters())]


@contextmanager
def _running_stats_kept(modules: list[nn.Module]) -> Iterator[None]:
    """The recomputation runs BatchNorm's training forward a second time, which would update
    its running statistics twice per step: they are put back as they were after it."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)]
    kept = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, kept, strict=True):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


def _checkpointed(modules: list[nn.Module], *, own_forward: bool = False):
    """One block's forward under torch.utils.checkpoint: its activations are not kept for
    backward but recomputed from its input when backward reaches it. `own_forward`: call the
    class's forward directly (the block's forward on the instance is this function; its own
    hooks already ran in nn.Module.__call__)."""

    def run(*args, **kwargs):
        for m in modules:
            call = type(m).forward.__get__(m) if own_forward else m
            args, kwargs = (call(*args, **kwargs),), {}
        return args[0]

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
            return run(*args, **kwargs)
        first = [True]

        def once_then_quietly(*a, **k):
            if first[0]:
                first[0] = False
                return run(*a, **k)
            with _running_stats_kept(modules):
                return run(*a, **k)

        # use_reentrant=False: torch's recommended variant; it handles keyword arguments and
        # inputs that need no gradient, and works under torch.compile and FSDP2.
        return checkpoint(once_then_quietly, *args, use_reentrant=False, **kwargs)

    return forward


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """--activation-checkpointing: recompute each block (`blocks_of`) in backward instead of
    keeping its activations, trading one more forward per step for memory. The model's
    modules, parameters and state_dict keys stay as they are (each block's forward is
    replaced on the instance), so checkpoints and every --sync mode see the same model."""
    blocks = blocks_of(model)
    if isinstance(model, nn.Sequential) and not hasattr(model, "blocks"):
        steps = [_checkpointed(run) for run in blocks]

        def forward(x):
            for step in steps:
                x = step(x)
            return x

        model.forward = forward
    else:
        for (block,) in blocks:
            block.forward = _checkpointed([block], own_forward=True)
    return model
