"""--compile: torch.compile on the model the training loop calls, once every wrapper and hook
is in place.

    torchrun --nproc-per-node 2 train_ddp.py --compile                 # DDP, graph per bucket
    torchrun --nproc-per-node 2 train_ddp.py --compile --sync overlap  # the hand-made modes
    python train_dp.py --compile

The module is compiled in place (`nn.Module.compile`), so it stays the same object with the
same state_dict keys: checkpoints, `unwrap` and every --sync mode see the model they built.

- `--sync ddp` (and torch-zero1): the module inside DDP is compiled, not the DDP wrapper.
  DDP's forward calls it inside `_inside_ddp_forward()`, and dynamo, seeing a DDP module
  active when it converts that frame, hands the captured graph to its DDPOptimizer
  (torch._dynamo.config.optimize_ddp, on by default). DDPOptimizer cuts the graph at DDP's
  bucket boundaries, counting parameter bytes from the output back as backward produces them
  (first bucket 1 MiB, then DDP's bucket_cap_mb, 25 MiB), and compiles each piece on its own,
  so a bucket's gradients are ready, and its all-reduce starts, while backward still runs the
  pieces before it. A model under 1 MiB of parameters (the default cnn, 288 KB) is one
  bucket and one graph; docs/compile.md counts them. (Compiling the DDP wrapper itself
  captures no graph on torch 2.14: its forward breaks the graph at DDP's logger and at the
  skipped `_inside_ddp_forward`.)
- `--compiled-autograd` (with --compile and --sync ddp): backward is traced too, by torch's
  compiled autograd, and DDP's all-reduces with it. DDP then uses its Python reducer, one
  functional all-reduce per parameter in a post-accumulate-grad hook, which compiled autograd
  can trace (the C++ reducer's hooks it cannot), instead of DDPOptimizer's graph per bucket:
  the two are alternatives. DDP chooses its reducer in its constructor from
  torch._dynamo.config.optimize_ddp, so ddp_kwargs(args) sets it on the line that builds DDP
  (parallel/ddp.py's choose_reducer); `compiled_autograd(args)`, entered by TrainLoop around
  the training loop, compiles every backward inside it. A flag rather than the default of
  --compile: torch calls the Python reducer experimental, and the first steps compile three
  graphs instead of one (the forward, and a backward with and one without the all-reduces,
  for --grad-accum's no_sync micro-steps); docs/compile.md counts them.
- The hand-made modes (allreduce, overlap, local-sgd, zero1/2/3): the plain model they hold
  is compiled. Their hooks keep working: forward pre-hooks and forward hooks on the
  root are traced with it (a collective inside one, as the buffer broadcast of models with
  BatchNorm, breaks the graph there and runs eagerly); the gradient hooks (overlap's
  post-accumulate-grad hooks, zero3's) run in the eager autograd engine after the compiled
  backward, all at its end, so compiled overlap no longer overlaps anything. zero3's
  per-unit gather hooks cut the model into 9 graphs (the cnn): correct, little gain.
- fsdp2 is refused: dynamo captures no graph from fully_shard's root forward (0 graphs, one
  break, docs/compile.md), so every step would run eagerly.
- train_dp.py with DataParallel over several GPUs is refused: DataParallel copies the module
  to each GPU on every forward, and the copies would call the compiled original.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from core.errors import UsageError

BACKEND = "inductor"  # torch.compile's backend for the scripts (tests patch in "aot_eager")
Backend = str | Callable


def maybe_compile(
    model: nn.Module, args: argparse.Namespace, backend: Backend | None = None
) -> None:
    """--compile: compile, in place, the model the training loop calls, once wrapped (the DDP
    model or the plain one in train_ddp.py, DataParallel's or the plain one in train_dp.py: the
    same line in both scripts). `backend` is torch.compile's (None: BACKEND; tests use
    "aot_eager": the same graph capture and autograd, without inductor's C++ build)."""
    backend = backend or BACKEND
    if not getattr(args, "compile", False):
        return
    if getattr(args, "sync", None) in ("fsdp2", "torch-hsdp"):
        raise UsageError(
            f"--compile does not combine with --sync {args.sync}: dynamo captures no graph from "
            "fully_shard's root forward on this torch, every step would run eagerly "
            "(docs/compile.md)"
        )
    if isinstance(model, nn.DataParallel):
        raise UsageError(
            "--compile does not combine with DataParallel over several GPUs: its per-forward "
            "copies of the module would call the compiled original (use train_ddp.py)"
        )
    if isinstance(model, DDP):  # the module inside: DDPOptimizer splits it at the buckets
        model = model.module
    model.compile(backend=backend)


@contextmanager
def compiled_autograd(args: argparse.Namespace, backend: Backend | None = None) -> Iterator[None]:
    """--compiled-autograd: inside the block every backward is captured by torch's compiled
    autograd, hooks included (DDP's Python reducer and its all-reduces), and compiled with
    `backend` (None: BACKEND). Without the flag, nothing changes."""
    if not getattr(args, "compiled_autograd", False):
        yield
        return
    # torch's own entry point for a backward called outside a compiled function (the
    # scripts call loss.backward() in plain sight); torch._dynamo loads on first use here.
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend=backend or BACKEND)):
        yield
