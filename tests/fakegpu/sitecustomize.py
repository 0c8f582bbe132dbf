"""Make a CPU machine look like a GPU host, to prove the test suite never uses a GPU by accident.

    make test-fakegpu
    FAKE_GPUS=2 PYTHONPATH=$PWD/tests/fakegpu .venv/bin/python -m pytest -m "not slow and not gpu"

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one, so
with this folder on PYTHONPATH every Python process runs this file: the pytest process and
every child it starts (forkserver ranks, torchrun and its workers, scripts), since they all
inherit the environment. With FAKE_GPUS=N set, the moment torch imports torch.cuda (during
`import torch`, never earlier: torch is not imported here, so a process that never imports it
pays nothing), torch.cuda is patched so that

- `is_available()` and `device_count()` report N GPUs, minus what CUDA_VISIBLE_DEVICES hides
  exactly as the CUDA runtime reads it: unset shows all N, "" shows none, "0,1" shows the
  listed devices up to the first one that does not exist;
- anything that would really use a GPU raises `FakeGPUTouched`: `_lazy_init` (which torch
  runs before the first CUDA tensor, kernel, synchronize, device query or RNG call),
  `init`, `set_device`, `current_device`, `synchronize`.

So code that asks "is there a GPU?" and follows the answer fails loudly on this CPU box, as it
would have silently run on cuda:0 on a real GPU host; tests/conftest.py's hiding of the GPUs
(CUDA_VISIBLE_DEVICES="") is what makes the unmarked suite pass under it.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder


class FakeGPUTouched(RuntimeError):
    """Raised where code running under FAKE_GPUS would have used a real GPU."""


def visible(total: int) -> int:
    """How many of `total` GPUs CUDA_VISIBLE_DEVICES leaves visible."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return total
    count = 0
    for item in value.split(","):
        if not item.strip().isdigit() or int(item) >= total:
            break  # the runtime ignores the list from the first invalid entry on
        count += 1
    return count


def patch(cuda, total: int) -> None:
    """Replace torch.cuda's answers about devices, and its ways in, by the fake's."""

    def is_available() -> bool:
        return visible(total) > 0

    def device_count() -> int:
        return visible(total)

    def refuse(name: str):
        def touched(*args, **kwargs):
            raise FakeGPUTouched(
                f"FAKE_GPUS={total}: this process touched CUDA (torch.cuda.{name}), which fake "
                "GPUs cannot run. Unless it is a child that a test marked `gpu` started with "
                "gpus=True (tests/multiproc.py), it would have used a real GPU on a GPU host."
            )

        return touched

    fakes = {"is_available": is_available, "device_count": device_count}
    for name in ("_lazy_init", "init", "set_device", "current_device", "synchronize"):
        fakes[name] = refuse(name)
    # torch.cuda's submodules that imported a function by name (torch.cuda.random) get the fake.
    replace = {id(getattr(cuda, name)): fake for name, fake in fakes.items()}
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("torch.cuda.")]
    for module in modules:
        for name, value in list(vars(module).items()):
            if name in fakes and id(value) in replace:
                setattr(module, name, replace[id(value)])
    for name, fake in fakes.items():
        setattr(cuda, name, fake)


class PatchTorchCuda(MetaPathFinder):
    """Finds nothing itself: when torch.cuda is about to be imported, it lets the other
    finders find it and has the module patched right after it has run, before the rest of
    torch (or anyone) can call it."""

    def __init__(self, total: int) -> None:
        self.total = total

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.cuda":
            return None
        sys.meta_path.remove(self)  # once per process; and not found again just below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            patch(module, self.total)

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if os.environ.get("FAKE_GPUS"):
    sys.meta_path.insert(0, PatchTorchCuda(int(os.environ["FAKE_GPUS"])))
