"""`module.` and `_orig_mod.` handled both ways: whatever wrapped the model when it was saved
(DataParallel, DDP, torch.compile, or a wrapper around one submodule), the file holds plain
keys; whatever wraps the model it is loaded into, plain and prefixed keys both load; and a
checkpoint of another model fails with the list of what does not match, model untouched."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import train_dp
from core.errors import run_cli
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    model_state,
    restore_training_state,
    training_state,
    unwrap,
    write_checkpoint,
)
from training.models import build_model
from training.optim import make_optimizer, make_scheduler


@pytest.fixture(scope="module")
def world_of_one():
    """DDP needs a process group: a gloo world of one in this process, with no network."""
    if dist.is_initialized():  # someone else's: use it and leave it to them
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def cnn(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 3, 32, num_classes)


class Holder(nn.Module):
    """A model whose own submodule is called `module`: that name is not a wrapper's."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


class Inner(nn.Module):
    """A wrapper inside a submodule, as when only the backbone is compiled or DP-wrapped."""

    def __init__(self, wrap) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.backbone = wrap(nn.Linear(4, 3))
        self.head = nn.Linear(3, 2)


WRAPPERS = {
    "plain": lambda m: m,
    "dp": nn.DataParallel,
    "ddp": DDP,
    "compiled": torch.compile,
    "ddp(compiled)": lambda m: DDP(torch.compile(m)),
    "compiled(ddp)": lambda m: torch.compile(DDP(m)),
}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_saved_keys_are_plain_and_prefixed_keys_load_into_every_wrapper(world_of_one):
    reference = cnn()
    plain_keys = list(reference.state_dict())
    files = {}
    for name, wrap in WRAPPERS.items():
        saved = wrap(cnn())
        assert list(model_state(saved)) == plain_keys, name
        assert type(unwrap(saved)) is nn.Sequential, name
        # What this project writes, and what a script that saves saved.state_dict() as it
        # is writes: module. and _orig_mod. prefixes in every order.
        files[f"{name} (plain keys)"] = model_state(saved)
        files[f"{name} (raw keys)"] = saved.state_dict()
    assert {next(iter(f)) for f in files.values()} >= {
        "0.weight",
        "module.0.weight",
        "_orig_mod.0.weight",
        "module._orig_mod.0.weight",
        "_orig_mod.module.0.weight",
    }
    for target_name, target_wrap in WRAPPERS.items():
        target = target_wrap(cnn(seed=1))
        for file_name, state in files.items():
            with torch.no_grad():
                for p in target.parameters():
                    p.zero_()
            load_model_state(target, state)
            assert_same_weights(target, reference), (file_name, target_name)


def test_wrappers_inside_a_submodule():
    plain = Inner(lambda m: m)
    for wrap in (nn.DataParallel, torch.compile):
        nested = Inner(wrap)
        assert set(nested.state_dict()) != set(plain.state_dict())  # the prefix is there
        assert model_state(nested).keys() == plain.state_dict().keys()
        target = Inner(lambda m: m)
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        load_model_state(target, nested.state_dict())
        assert_same_weights(target, nested)
        load_model_state(nested, plain.state_dict())  # and plain keys into the nested one


def test_a_submodule_really_called_module_keeps_its_name(world_of_one):
    torch.manual_seed(0)
    source = DDP(Holder())
    assert list(model_state(source)) == ["module.weight", "module.bias", "head.weight", "head.bias"]
    plain = Holder()
    load_model_state(plain, source.state_dict())  # keys module.module.weight, ...
    assert_same_weights(plain, source)
    wrapped = nn.DataParallel(Holder())
    load_model_state(wrapped, plain.state_dict())
    assert_same_weights(wrapped, source)


def test_another_architecture_is_refused_with_the_list_and_the_model_unchanged():
    state = cnn().state_dict()
    mlp = build_model("mlp", 3, 32, 10)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_model_state(nn.DataParallel(mlp), state, "other.pt")
    assert str(info.value) == (
        "other.pt: checkpoint does not fit this model ("
        "missing 1.weight, 1.bias, 5.weight, 5.bias; "
        "unexpected 0.weight, 0.bias, 8.weight, 8.bias, 10.weight, 10.bias; "
        "shape mismatch 3.weight (32, 16, 3, 3) in file vs (128, 256), "
        "3.bias (32,) in file vs (128,))"
    )
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())

    with pytest.raises(CheckpointError, match=r"shape mismatch 10\.weight \(10, 128\) in file vs "):
        load_model_state(cnn(num_classes=5), state)


def _args(**kw) -> argparse.Namespace:
    defaults = dict(lr=0.1, momentum=0.9, weight_decay=0.0, warmup_steps=0)
    defaults.update(lr_schedule="constant", batch_size=8, grad_accum=1)
    return argparse.Namespace(**{**defaults, **kw})


def _train_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_optimizer_state_moves_between_wrappers(world_of_one, tmp_path):
    """Momentum buffers saved from a DDP-wrapped model resume in a plain one: the next step
    is bit for bit the step the DDP model takes."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    args = _args()
    ddp = DDP(cnn())
    opt = make_optimizer(ddp, args)
    sched = make_scheduler(opt, args, 10)
    for _ in range(2):
        _train_step(ddp, opt, x, y)
    state = training_state(
        ddp, opt, sched, None, epoch=0, step=2, step_in_epoch=2, world_size=1, args=args
    )
    write_checkpoint(tmp_path / "checkpoint.pt", state)

    plain = cnn(seed=5)
    plain_opt = make_optimizer(plain, args)
    restore_training_state(
        load_checkpoint(tmp_path / "checkpoint.pt"),
        plain,
        plain_opt,
        make_scheduler(plain_opt, args, 10),
        None,
        "checkpoint.pt",
    )
    momentum = [plain_opt.state[p]["momentum_buffer"] for p in plain.parameters()]
    assert all(m.abs().sum() > 0 for m in momentum)
    _train_step(ddp, opt, x, y)
    _train_step(plain, plain_opt, x, y)
    assert_same_weights(plain, ddp)


def test_resume_with_another_model_fails_in_one_line(tmp_path, capsys):
    # The run's own flags (the scripts' defaults): only the model differs.
    args = _args(batch_size=32, lr=train_dp.parse_args([]).lr)
    model = cnn()
    opt = make_optimizer(model, args)
    state = training_state(
        model,
        opt,
        make_scheduler(opt, args, 10),
        None,
        epoch=0,
        step=0,
        step_in_epoch=0,
        world_size=1,
        args=args,
    )
    path = tmp_path / "cnn.pt"
    write_checkpoint(path, state)
    argv = ["--model", "mlp", "--resume", str(path), "--batch-size", "32"]
    argv += ["--train-size", "64", "--no-eval", "--out-dir", str(tmp_path / "run")]
    assert run_cli(train_dp.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: {path}: checkpoint does not fit this model (missing 1.weight")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
