"""See the communication of a training run: every collective's name, bytes and time.

Two ways in, because collectives reach the network by two roads:

* `CommTracer` as a context manager (or `start()`/`stop()`) wraps the torch.distributed
  collective functions (`dist.all_reduce`, `dist.broadcast`, ...) for its duration, so any
  code that calls them through the module (`dist.X`, or comm.compat's names, which look
  them up there on each call) is seen: metric reductions, hand-written sync strategies, the
  ring in comm/ring.py. Code that imported a torch function by name before the tracer
  started (`from torch.distributed import all_reduce`) keeps the original and is not seen.
* DDP's reducer calls the process group from C++, past any Python function, so
  `attach(ddp_model)` registers a DDP communication hook that records each gradient bucket
  and then does what DDP does without a hook (torch's own `allreduce_hook`: divide by the
  world size, all-reduce).

`end_step()` closes a training step and returns its totals: the payload bytes of its
collectives, the bytes each rank sends if every collective runs as a bandwidth-optimal ring
(comm.ring.bus_factor x payload; exact for point-to-point), and the seconds spent. For DDP the
gradient payload per step is the model's gradient bytes, so a rank sends 2(N-1)/N x model
bytes per step: `summary()` puts that theory next to the measurement.

Each event also names its process group (`group_label`): "world", or the `group_desc` a group
was created with, so that `summary()["groups"]` and the step's `comm/sent_per_rank/<group>`
scalars split the traffic by group. comm/topology.py names its groups "intra-node" and
"inter-node": the inter-node bytes are the ones a slow network carries (docs/topology.md).

With `out_dir`, the tracer also keeps a timeline: each collective's start and end, and the
phases of each step (forward and backward from module and gradient hooks, the optimizer step
from torch.optim's global step hooks), all relative to the step's start, written on a clean
exit to <out_dir>/timeline/rank<R>.json. `python -m study.timeline <out_dir>` draws them and
computes how much of the communication was hidden behind computation.

Times are host wall time. With gloo a synchronous call returns when the data has moved; an
async call (DDP's buckets) is timed until its future completes. With NCCL a call returns once
the kernel is queued, so the seconds are launch cost; use the profiler (`make_profiler`) to see
GPU time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from comm.ring import bus_factor

# torch.distributed function -> the kind of collective it is (renamed variants share a kind).
TRACED = {
    "all_reduce": "all_reduce",
    "reduce": "reduce",
    "broadcast": "broadcast",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "gather": "gather",
    "scatter": "scatter",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "batch_isend_irecv": "p2p",
    "barrier": "barrier",
}


def _nbytes(t: torch.Tensor | list | None) -> int:
    if t is None:
        return 0
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nbytes(x) for x in t)


def payload_bytes(name: str, args: tuple, world_size: int) -> int:
    """The collective's size in nccl-tests' sense: the all-reduced / broadcast / sent tensor,
    the all-gather output, the reduce-scatter and all-to-all input."""
    kind = TRACED[name]
    if kind in ("all_reduce", "reduce", "broadcast", "send", "recv"):
        return _nbytes(args[0])
    if name == "all_gather":  # (tensor_list, tensor)
        return _nbytes(args[1]) * world_size
    if kind == "all_gather":  # (output, input)
        return _nbytes(args[0])
    if kind in ("reduce_scatter", "all_to_all"):  # (output(s), input(s))
        return _nbytes(args[1])
    if kind in ("gather", "scatter"):  # (tensor, list): one tensor per rank
        return _nbytes(args[0]) * world_size
    if kind == "p2p":  # what this rank sends; the receives are its peers' sends
        return sum(_nbytes(op.tensor) for op in args[0] if op.op.__name__ == "isend")
    return 0  # barrier


def group_label(group: dist.ProcessGroup | None) -> str:
    """'world' for the default group, else the group's `group_desc`, or its ranks when it was
    created without one (group_desc 'undefined')."""
    if group is None or group is dist.group.WORLD:
        return "world"
    desc = getattr(group, "group_desc", "undefined")
    if desc and desc != "undefined":
        return desc
    return "ranks " + ",".join(map(str, dist.get_process_group_ranks(group)))


def _sent_bytes(name: str, args: tuple, payload: int, world_size: int) -> float:
    """Bytes this rank sends: exact for point-to-point, the ring model for collectives."""
    if name == "batch_isend_irecv":
        return float(payload)
    return bus_factor(TRACED[name], world_size) * payload


@dataclass
class Event:
    name: str  # the torch.distributed function, or "ddp_bucket" for DDP's gradient buckets
    kind: str  # all_reduce, all_gather, ... (see TRACED)
    bytes: int  # payload_bytes
    sent: float  # bytes this rank sends (ring model for collectives)
    seconds: float
    start: float = 0.0  # time.perf_counter() when it was issued
    group: str = "world"  # group_label of the process group it ran on
    # An async collective: the future that completes once `seconds` holds its whole time.
    timed: torch.futures.Future | None = field(default=None, repr=False, compare=False)

    def settle(self) -> None:
        """Wait until an async event's duration is final (its work was waited for already:
        this only waits for the timing callback, which runs right after completion)."""
        if self.timed is not None:
            self.timed.wait()
            self.timed = None


@dataclass
class StepRecord:
    """One training step as the timeline sees it: [t0, t1] in perf_counter seconds, the
    compute phases ([name, start, end]) and the range of its events in `CommTracer.events`."""

    t0: float
    t1: float = 0.0
    phases: list[list] = field(default_factory=list)
    first_event: int = 0
    last_event: int = 0


class CommTracer:
    """Record every collective issued while active; see the module docstring."""

    def __init__(self, enabled: bool = True, out_dir: Path | str | None = None) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.events: list[Event] = []
        self.steps: list[dict[str, float]] = []
        self.records: list[StepRecord] = []  # the timeline, one per end_step()
        self.model_bytes = 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._step_start = 0
        self._current = StepRecord(time.perf_counter())
        self._saved: list[tuple[object, str, object]] = []
        self._handles: list = []  # hooks to remove in stop()
        self._local = threading.local()  # depth of traced calls on this thread

    # ---- recording -------------------------------------------------------------------------

    def _busy(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def _wrap(self, name: str, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            # Collectives built from other collectives (send -> isend, the deprecated names ->
            # the new ones) are counted once, as the outermost call.
            if self._busy():
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            group = bound.arguments.get("group")
            if name == "batch_isend_irecv":  # the group of its point-to-point ops
                group = bound.args[0][0].group if bound.args[0] else None
                world = self.world_size
            else:
                world = dist.get_world_size(group)
            payload = payload_bytes(name, bound.args, world)
            sent = _sent_bytes(name, bound.args, payload, world)
            event = Event(name, TRACED[name], payload, sent, 0.0, group=group_label(group))
            self._local.depth = 1
            start = event.start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self._local.depth = 0
            event.seconds = time.perf_counter() - start
            if isinstance(result, dist.Work) and bound.arguments.get("async_op"):
                event.timed = result.get_future().then(
                    lambda _: setattr(event, "seconds", time.perf_counter() - start)
                )
            self.events.append(event)
            return result

        return traced

    # Takes a dist.GradBucket, returns a Future[Tensor]. Not annotated: DDP compares the
    # annotations with those objects, and this module's annotations are strings.
    def _ddp_hook(self, state, bucket):
        buffer = bucket.buffer()
        payload = _nbytes(buffer)
        event = Event(
            "ddp_bucket",
            "all_reduce",
            payload,
            bus_factor("all_reduce", self.world_size) * payload,
            0.0,
        )
        self.events.append(event)
        start = event.start = time.perf_counter()
        self._local.depth = 1  # the hook's own dist.all_reduce is this event, not another
        try:
            future = default_hooks.allreduce_hook(state, bucket)
        finally:
            self._local.depth = 0

        def done(fut: torch.futures.Future) -> torch.Tensor:
            event.seconds = time.perf_counter() - start
            return fut.value()

        return future.then(done)

    # ---- lifecycle -------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Count the model's gradient bytes (for the ring theory) and, for a DDP model,
        register the recording comm hook. Call before the first backward."""
        if not self.enabled:
            return
        self.model_bytes = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
        self._handles += [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(self._forward_end),
        ]
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        if isinstance(model, DDP):
            # DDP takes one hook. If a sync strategy registered its own, that hook's Python
            # collectives go through torch.distributed and are recorded there instead.
            with contextlib.suppress(RuntimeError):
                model.register_comm_hook(None, self._ddp_hook)

    # ---- phases of a step, for the timeline --------------------------------------------------
    # Forward: the model's outermost call. Backward: from the moment the gradient of the
    # model's output exists (a hook on the output tensor) to the last parameter gradient
    # accumulated. Optimizer: torch.optim's global step hooks. The loss between forward
    # and backward, data loading and logging are in no phase.

    def _phase(self, name: str) -> list:
        phase = [name, time.perf_counter(), None]
        self._current.phases.append(phase)
        return phase

    def _forward_start(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self._forward = self._phase("forward")

    def _forward_end(self, module: nn.Module, args, output) -> None:
        if module.training and torch.is_grad_enabled():
            self._forward[2] = time.perf_counter()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._backward_start)

    def _backward_start(self, grad: torch.Tensor) -> None:
        self._backward = self._phase("backward")
        self._backward[2] = self._backward[1]

    def _grad_ready(self, param: torch.Tensor) -> None:
        backward = getattr(self, "_backward", None)
        if backward is not None:
            backward[2] = time.perf_counter()

    def _optimizer_start(self, optimizer, args, kwargs) -> None:
        self._optimizer = self._phase("optimizer")

    def _optimizer_end(self, optimizer, args, kwargs) -> None:
        self._optimizer[2] = time.perf_counter()

    def start(self) -> CommTracer:
        """Wrap the collective functions in torch.distributed."""
        if self.enabled and not self._saved:
            self.world_size = dist.get_world_size() if dist.is_initialized() else 1
            self.rank = dist.get_rank() if dist.is_initialized() else 0
            self._current = StepRecord(time.perf_counter())
            self._handles += [
                register_optimizer_step_pre_hook(self._optimizer_start),
                register_optimizer_step_post_hook(self._optimizer_end),
            ]
            wrapped = {}  # id(original) -> wrapper
            for name in TRACED:
                original = getattr(c10d, name, None)
                if original is not None:  # None: not in this torch version
                    wrapped[id(original)] = self._wrap(name, original)
            # Replace every reference to an original in torch.distributed and in its
            # implementation module, whose own helpers (P2POp's check of isend/irecv) compare
            # functions by identity and must see the same objects as the callers.
            for module in (dist, c10d):
                for attr, value in list(vars(module).items()):
                    if id(value) in wrapped:
                        self._saved.append((module, attr, value))
                        setattr(module, attr, wrapped[id(value)])
        return self

    def stop(self) -> None:
        """Put the original functions back and remove the hooks."""
        for module, attr, value in reversed(self._saved):
            setattr(module, attr, value)
        self._saved.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> CommTracer:
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None and self.enabled and self.out_dir is not None and self.records:
            self.write_timeline(self.out_dir / "timeline" / f"rank{self.rank}.json")

    # ---- reporting -------------------------------------------------------------------------

    def end_step(self) -> dict[str, float]:
        """Totals of the events since the previous call, as TensorBoard scalars
        ({} when disabled). Async events still in flight are timed as far as they got."""
        if not self.enabled:
            return {}
        events = self.events[self._step_start :]
        for e in events:
            e.settle()
        record = self._current
        record.t1 = time.perf_counter()
        record.first_event, record.last_event = self._step_start, len(self.events)
        self.records.append(record)
        self._current = StepRecord(record.t1)
        self._step_start = len(self.events)
        totals = {
            "comm/bytes": float(sum(e.bytes for e in events)),
            "comm/sent_per_rank": float(sum(e.sent for e in events)),
            "comm/ring_theory_sent_per_rank": self.ring_theory(),
            "comm/seconds": sum(e.seconds for e in events),
            "comm/calls": float(len(events)),
        }
        for label, sent in self.sent_by_group(events).items():
            if label != "world":  # a split only where groups other than the world ran
                totals[f"comm/sent_per_rank/{label}"] = sent
        self.steps.append(totals)
        return totals

    @staticmethod
    def sent_by_group(events: list[Event]) -> dict[str, float]:
        """The bytes `events` sent, per process group label."""
        sent: dict[str, float] = {}
        for e in events:
            sent[e.group] = sent.get(e.group, 0.0) + e.sent
        return sent

    def ring_theory(self) -> float:
        """Bytes a rank sends per step to all-reduce the gradients on a ring: 2(N-1)/N x the
        model's gradient bytes."""
        return bus_factor("all_reduce", self.world_size) * self.model_bytes

    def timeline(self) -> dict:
        """Every step's phases and collectives, in seconds from the step's start."""
        steps = []
        for r in self.records:
            events = self.events[r.first_event : r.last_event]
            steps.append(
                {
                    "duration": r.t1 - r.t0,
                    "phases": [
                        [name, a - r.t0, (b if b is not None else a) - r.t0]
                        for name, a, b in r.phases
                    ],
                    "comm": [
                        {
                            "name": e.name,
                            "bytes": e.bytes,
                            "start": e.start - r.t0,
                            "end": e.start + e.seconds - r.t0,
                            "seconds": e.seconds,
                        }
                        for e in events
                    ],
                    # What end_step() reported for the step (TensorBoard's comm/seconds).
                    "tracer_seconds": self.steps[len(steps)]["comm/seconds"],
                }
            )
        backend = dist.get_backend() if dist.is_initialized() else None  # nccl: launch times
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "backend": backend,
            "steps": steps,
        }

    def write_timeline(self, path: Path) -> None:
        """`timeline()` as JSON, written atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.timeline()))
        os.replace(tmp, path)

    def summary(self) -> dict:
        """Everything recorded, for summary.json."""
        ops: dict[str, dict[str, float]] = {}
        groups: dict[str, dict[str, float]] = {}  # the same totals per process group
        for e in self.events:
            for total in (ops.setdefault(e.name, {}), groups.setdefault(e.group, {})):
                total["calls"] = total.get("calls", 0) + 1
                total["bytes"] = total.get("bytes", 0) + e.bytes
                total["sent"] = total.get("sent", 0.0) + e.sent
                total["seconds"] = total.get("seconds", 0.0) + e.seconds
        return {
            "world_size": self.world_size,
            "model_grad_bytes": self.model_bytes,
            "ring_theory_sent_per_rank_per_step": self.ring_theory(),
            "sent_per_rank_per_step": [s["comm/sent_per_rank"] for s in self.steps],
            "bytes_per_step": [s["comm/bytes"] for s in self.steps],
            "seconds_per_step": [s["comm/seconds"] for s in self.steps],
            "ops": ops,
            "groups": groups,
        }


def make_profiler(out_dir: Path, rank: int, enabled: bool) -> torch.profiler.profile | None:
    """A torch.profiler over steps 3-5 (step 1 is skipped: DDP builds its buckets there),
    written as a Chrome trace to <out_dir>/profile/rank<R>.*.pt.trace.json. Open it at
    https://ui.perfetto.dev or chrome://tracing (TensorBoard shows it only with the
    torch-tb-profiler plugin, which this project does not install): under DDP the all-reduce
    of early buckets runs while backward still computes later layers. Call `.step()` after
    every optimizer step."""
    if not enabled:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    else:
        # Kineto, the profiler's tracing library, probes for GPUs even when asked for CPU
        # activities only, and on a machine without a CUDA driver logs "ERROR ...
        # gpuGetDeviceCount failed with code 35" (cudaErrorInsufficientDriver) and two USDT
        # lines: harmless, the CPU trace is complete. Level 5 keeps its log quiet; set
        # KINETO_LOG_LEVEL yourself to see it.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(
            str(Path(out_dir) / "profile"), worker_name=f"rank{rank}"
        ),
    )
