"""What --trace-comm and --profile add to a run, as one context manager that train_dp.py and
train_ddp.py enter alike around their training loop. Both flags off, it does nothing.

    with Observer(args, env, model, out_dir) as observer:
        for ...:  # after every optimizer step
            run.scalars(step, **observer.step())
    summary = {..., **observer.summary()}

--trace-comm records every torch.distributed collective and DDP's gradient buckets
(comm/tracer.py), with their timeline in <out-dir>/timeline/ (python -m study.timeline);
--profile writes a torch.profiler trace of steps 3-5 per rank.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import torch.nn as nn

from comm.tracer import CommTracer, make_profiler
from core.dist import DistEnv


class Observer:
    """The tracer and the profiler of one run. Entered after the model is built and resumed,
    so what they record is training alone; leaving puts torch.distributed's functions back
    and closes the profiler, also when the run fails."""

    def __init__(self, args: argparse.Namespace, env: DistEnv, model: nn.Module, out_dir: Path):
        # With out_dir, a clean exit also writes <out_dir>/timeline/rank<R>.json (study/timeline.py)
        self.tracer = CommTracer(enabled=args.trace_comm, out_dir=out_dir)
        self.profiler = make_profiler(out_dir, env.rank, args.profile)
        self.model = model
        self._stack = ExitStack()

    def __enter__(self) -> Observer:
        self._stack.enter_context(self.tracer)
        self.tracer.attach(self.model)  # a comm hook on DDP's reducer, which bypasses dist.*
        if self.profiler:
            self._stack.enter_context(self.profiler)
        return self

    def __exit__(self, *exc) -> None:
        # Pass the exception on: the tracer writes its timeline only when the run ended cleanly.
        self._stack.__exit__(*exc)

    def step(self) -> dict[str, float]:
        """Call after every optimizer step: the step's collectives as TensorBoard scalars
        (comm/*; none without --trace-comm), and the profiler moves on to its next step."""
        scalars = self.tracer.end_step()
        if self.profiler:
            self.profiler.step()
        return scalars

    def summary(self) -> dict:
        """For summary.json: the 'comm' key with --trace-comm, else nothing."""
        return {"comm": self.tracer.summary()} if self.tracer.enabled else {}
