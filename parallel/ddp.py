"""--sync ddp: DistributedDataParallel's own reducer, the reference every other mode is
tested against.

Resuming it exactly, at any world size
--------------------------------------
DDP all-reduces flat buckets of gradients. Its first synchronising backward reduces the
layout it was built with (parameters in definition order); during that backward it notes
the order in which the gradients become ready, and at the next forward it rebuilds the
buckets in that order, once for the whole run. At 3 or more gloo ranks the sum of an
element depends on its offset in the buffer (which rank's chunk of the ring it falls in),
so a process that resumes at step k would reduce step k + 1 in the first layout where the
uninterrupted run reduced it in the rebuilt one: the same run to float rounding, not bit for
bit (at 2 ranks the sum of two numbers has no order, and nothing shows).

So `DDPSync` records the ready order of the first synchronising backward, the checkpoint
keeps it (`rank_state`), and a resumed process makes DDP rebuild to it before its first step
(`load_rank_state`): one backward of a zero graph through DDP whose gradients become ready
in the recorded order (an all-reduce of zeros; the gradients it leaves are dropped). With
`find_unused_parameters=True` DDP never rebuilds its buckets, and nothing is needed.
(`static_graph=True` rebuilds them otherwise; train_ddp.py does not use it, and it is left
out here.)

DDP's Python reducer (--compiled-autograd)
------------------------------------------
With torch._dynamo.config.optimize_ddp = "python_reducer" when it is constructed, DDP builds no
C++ buckets: it registers one post-accumulate-grad hook per parameter that divides the
gradient by W and all-reduces it with a functional collective, which compiled autograd traces
into the backward graph (inductor then fuses those all-reduces into buckets of its own). DDP
reads that setting in its constructor, not from an argument: `choose_reducer` sets it for the
next DDP(...) (parallel/factory.py's ddp_kwargs, evaluated on the line that builds it).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from parallel.base import Sync, broadcast_buffers

if TYPE_CHECKING:  # annotations only: the page loads no more of the repository than it uses
    from core.dist import DistEnv

READY_ORDER = "ddp_ready_order"  # the rank state's key


def choose_reducer(python: bool) -> None:
    """Make the next DDP(...) of this process use its Python reducer (`python`) or its C++ one,
    through the setting DDP's constructor reads."""
    if python:
        torch._dynamo.config.optimize_ddp = "python_reducer"
    # torch's default back (True: DDPOptimizer under --compile) where an earlier DDP of this
    # process had the Python one (tests build many); untouched, and not imported, otherwise.
    elif "torch._dynamo" in sys.modules and torch._dynamo.config.optimize_ddp == "python_reducer":
        torch._dynamo.config.optimize_ddp = True


class DDPSync(Sync):
    """DistributedDataParallel: broadcasts rank 0's parameters and buffers when it wraps the
    model, then all-reduces gradient buckets from autograd hooks while backward is still
    running, so communication overlaps computation.

    `model` is a DDP model (train_ddp.py wraps it in plain sight) or a plain module, which
    is wrapped here (benchmarks, tests; `bucket_bytes` sets DDP's bucket cap then).
    parallel/compressed.py adds torch's compression hooks (--comm-hook).

    `find_unused_parameters` (--find-unused-parameters) is DDP's option for models where a
    parameter may get no gradient (a branch skipped by an `if`, a frozen layer): after every
    forward DDP walks the autograd graph from the outputs and marks what it cannot reach as
    ready, and all-reduces a per-parameter "used" map, so that such a parameter keeps
    `grad is None` and is not stepped. Without it DDP stops at the next forward with
    "Expected to have finished reduction in the prior iteration" (pitfalls/unused_parameters.py).
    """

    def __init__(
        self,
        model: nn.Module,
        env: DistEnv,
        bucket_bytes: int | None = None,
        find_unused_parameters: bool = False,
    ) -> None:
        if isinstance(model, DDP):
            if bucket_bytes is not None:
                raise ValueError("bucket_bytes: the model is already wrapped, with its own cap")
            if model.find_unused_parameters != find_unused_parameters:
                raise ValueError(
                    "find_unused_parameters: the model is already wrapped without it; "
                    "wrap it with parallel.factory.ddp_kwargs(args)"
                )
        else:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            kwargs = {} if bucket_bytes is None else {"bucket_cap_mb": bucket_bytes / 2**20}
            if find_unused_parameters:
                kwargs["find_unused_parameters"] = True
            model = DDP(model, device_ids=device_ids, **kwargs)
        super().__init__(model)
        # DDP's own list: the parameters that require a gradient, shared ones once.
        self.params = [
            p
            for name, p in model.module.named_parameters()
            if p.requires_grad and name not in model.parameters_to_ignore
        ]
        # DDP rebuilds its buckets from the first synchronising backward, unless it looks for
        # unused parameters (then it never rebuilds: nothing to record), or reduces each
        # gradient on its own (the Python reducer: no C++ buckets). static_graph, which
        # rebuilds otherwise and which train_ddp.py does not use, is left as DDP has it.
        self.ready = None
        python = getattr(model, "_use_python_reducer", False)
        if not model.static_graph and not model.find_unused_parameters and not python:
            self.ready = ReadyOrder(self.params, lambda: model.require_backward_grad_sync)

    def no_sync(self) -> AbstractContextManager:
        # Forward *and* backward must run inside no_sync(): DDP decides during forward
        # whether the coming backward reduces gradients.
        return self.model.no_sync()

    @contextmanager
    def consolidated(self, optimizer) -> Iterator[None]:
        # Each rank's BatchNorm statistics have moved with its own last batch. DDP replaces
        # them with rank 0's before the next training forward anyway; doing it now makes
        # every rank evaluate the model that the checkpoint holds.
        broadcast_buffers(self.model.module)
        yield

    def rank_state(self, optimizer) -> dict:
        order = self.ready.order if self.ready else None
        return {READY_ORDER: order} if order is not None else {}

    def load_rank_state(self, optimizer, state: dict | None, step: int) -> None:
        order = (state or {}).get(READY_ORDER)
        # None: a checkpoint written before any synchronising step, or by a DDP that does not
        # rebuild (nor does this one then)
        if order is not None and self.ready is not None:
            rebuild_buckets(self.model, self.params, order)


class ReadyOrder:
    """The order in which backward makes the gradients of `params` ready (indices into
    `params`), recorded once: in the first backward during which `counts()` is true and every
    parameter gets a gradient. Its hooks are removed after that backward."""

    def __init__(self, params: list[nn.Parameter], counts: Callable[[], bool]) -> None:
        self.params = params
        self.counts = counts
        self.order: list[int] | None = None
        self._seen: list[int] = []
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(self._ready, i))
            for i, p in enumerate(params)
        ]

    def _ready(self, index: int, param: torch.Tensor) -> None:
        if not self.counts():
            return
        if not self._seen:  # the first gradient of this backward: settle at its end
            torch.autograd.Variable._execution_engine.queue_callback(self._settle)
        self._seen.append(index)

    def _settle(self) -> None:
        # After the backward: a hook may not be removed while autograd is running the hooks.
        if len(self._seen) == len(self.params):
            self.order = self._seen
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
        self._seen = []


def rebuild_buckets(model: DDP, params: list[nn.Parameter], order: object) -> None:
    """Make DDP rebuild its buckets in `order` (a checkpoint's ready order of `params`, DDP's
    parameters: untrusted, ValueError if it does not fit) before the first step, as the run
    that wrote the checkpoint did after its first."""
    n = len(params)
    if not (
        isinstance(order, list)
        and all(type(i) is int for i in order)
        and sorted(order) == list(range(n))
    ):
        raise ValueError(f"its DDP gradient order is not an order of this model's {n} parameters")
    # What DDP.forward does around the module, with a zero graph in place of the module: its
    # backward makes the parameters' gradients ready last-created first (autograd runs the
    # node created last among those ready, and accumulates a gradient as soon as it is
    # computed), so the first of `order` is built last. Any input will do.
    model._pre_forward(torch.zeros((), device=params[0].device))
    with torch.enable_grad():
        out = None
        for i in reversed(order):
            term = params[i].sum() * 0
            out = term if out is None else out + term
    model._post_forward(out).backward()
    for p in params:
        p.grad = None  # zeros, all-reduced: the first step starts from none, as it would
