"""The bookkeeping around the training step, shared by train_dp.py and train_ddp.py, so that
their loops show the step itself and nothing else:

    steps = Steps.count(len(loader), args)  # per epoch, and in all
    loop = TrainLoop(args, env, run, steps, at, checkpoints, clip, fault, model, ...)
    with loop:  # --trace-comm, --profile, and SIGTERM: finish the step, save, leave
        for epoch in loop.epochs():  # from the checkpoint's epoch on
            sampler.set_epoch(epoch)
            for micro, (images, labels) in enumerate(loop.batches(loader, sampler)):
                ...  # forward, loss, backward
                loop.count(loss, logits, labels)
                if not last_micro:
                    continue
                ...  # the optimizer step
                loop.after_step()  # save when due, log, the preemption check
            ...  # evaluation
            loop.end_epoch(metrics)  # the epoch's checkpoint
    return loop.finish(checksum, script=..., ...)  # summary.json

Exact resume is arithmetic on the checkpoint's `Position` (epoch, step, step in the epoch):
the run starts in the checkpoint's epoch at its step, the sampler skips the samples of the
steps already taken (`EpochPlan`), and every checkpoint names the step after which it was
written, in the epoch it belongs to. A resumed run therefore draws the same batches, in the
same order, as one that never stopped (tests/test_training_resume.py).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from core.dist import DistEnv
from core.errors import UsageError
from parallel.base import Sync
from parallel.clip import GradClip
from training.checkpoint import CheckpointManager, Position, param_checksum
from training.compiled import compiled_autograd
from training.gpt import show_sample
from training.guard import LossWatch
from training.heartbeat import Heartbeat
from training.metrics import Totals, bits_text, scalars
from training.observe import Observer
from training.preempt import Preempted, Preemption
from training.runlog import RunLog
from training.sharded import ShardedCheckpoints


@dataclass(frozen=True)
class Steps:
    """How many optimizer steps an epoch has, and the run in all (--epochs, --max-steps)."""

    per_epoch: int
    total: int

    @classmethod
    def count(cls, batches_per_epoch: int, args: argparse.Namespace) -> Steps:
        per_epoch = batches_per_epoch // args.grad_accum
        if per_epoch == 0:
            raise UsageError(
                f"--grad-accum {args.grad_accum} is more than the {batches_per_epoch} batches "
                "per epoch"
            )
        total = per_epoch * args.epochs
        return cls(per_epoch, min(total, args.max_steps) if args.max_steps else total)


@dataclass(frozen=True)
class EpochPlan:
    """The part of one epoch that this run takes: `n_steps` steps from step `first` of the
    epoch (the checkpoint's step when the run resumes inside it, else 0)."""

    epoch: int
    first: int
    n_steps: int
    per_epoch: int

    def skipped_samples(self, args: argparse.Namespace) -> int:
        """The samples of this rank's shard that the steps before `first` drew."""
        return self.first * args.grad_accum * args.batch_size

    def position(self, done: int) -> tuple[int, int]:
        """(epoch, step in the epoch) that a checkpoint after `done` steps of the part names:
        the start of the next epoch once this one is complete."""
        if self.first + done == self.per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.first + done


def make_checkpoints(
    out_dir: Path,
    keep: int,
    env: DistEnv,
    log: Callable[..., None],
    devices: list[torch.device],
    sync: Sync | None = None,
) -> CheckpointManager | ShardedCheckpoints:
    """The checkpoints of --out-dir: one file each (training/checkpoint/), or, for the sharded
    --sync modes, one folder of per-rank shards each (training/sharded.py); both are saved and
    resumed through the same calls."""
    if sync is not None and sync.sharded:
        return ShardedCheckpoints(out_dir, keep, env, sync, log=log)
    return CheckpointManager(out_dir, keep, env, log, devices, sync=sync)


class TrainLoop:
    """Everything the training loop does besides the step: the epochs and batches to take
    (from a checkpoint's position on), metrics and their log lines, checkpoints, the stall
    watch, the preemption check, --trace-comm and --profile, and the run's summary."""

    def __init__(
        self,
        args: argparse.Namespace,
        env: DistEnv,
        run: RunLog,
        steps: Steps,
        at: Position,
        checkpoints: CheckpointManager | ShardedCheckpoints,
        clip: GradClip,
        fault: Callable[[int], None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.args, self.env, self.run, self.steps, self.at = args, env, run, steps, at
        self.checkpoints, self.clip, self.model = checkpoints, clip, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.step = at.step
        self.global_batch = args.batch_size * env.world_size * args.grad_accum
        self.fault = fault  # training/faults.py: called after every step (TRAIN_FAULT)
        # Names a rank that stops (training/heartbeat.py); train_dp.py has no --stall-timeout:
        # one process cannot stall behind itself, and a world of one watches nothing anyway.
        self.heartbeat = Heartbeat(env, getattr(args, "stall_timeout", 0))
        self.totals = Totals(env.device)
        self.watch = LossWatch(args, env.device)  # a non-finite loss stops the run at a log line
        self.history: list[dict] = []
        self.train_time, self.samples = 0.0, 0
        self.final_train: dict = {}
        self.metrics: dict = {}
        # SIGTERM, --preempt-signal: finish the step, save, leave the `with` (training/preempt.py)
        self.preempt = Preemption(args.preempt_signal, env)
        self.observer = Observer(args, env, model, Path(args.out_dir))
        if getattr(args, "async_save", False):  # every rank, here (sharded: a new group)
            checkpoints.enable_async()
        self.plan: EpochPlan | None = None
        self.done = 0  # steps taken of the plan's part of the epoch
        self.bar = None  # the epoch's progress bar, from batches()
        self._stack = ExitStack()

    def __enter__(self) -> TrainLoop:
        with ExitStack() as stack:  # if the second fails to enter, the first is left again
            stack.enter_context(self.observer)
            stack.enter_context(self.preempt)  # swallows the exception stop() raises
            stack.enter_context(compiled_autograd(self.args))  # --compiled-autograd; else nothing
            stack.push(self._last_save)  # runs first on the way out, inside the preemption's
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def _last_save(self, kind, error, tb) -> None:
        """--async-save: the run (or its preemption) is over only once its last checkpoint is
        on disk. Every rank waits at the same place, and a failed write fails the run. On an
        error path, where peers may be gone, a rank waits only for a write of its own."""
        if kind is None or issubclass(kind, Preempted):
            self.checkpoints.settle()
        else:
            self.checkpoints.abandon()

    # ---- where the run goes: epochs and batches

    def epochs(self) -> Iterator[int]:
        """The epochs left, each with its plan: from the checkpoint's step in the first one,
        up to --max-steps in the last one."""
        start = self.at.epoch
        for epoch in range(start, self.args.epochs):
            if self.step >= self.steps.total:
                break
            if epoch > start and self.preempt.requested():  # came during eval or the save
                self.preempt.stop(self.step)  # the epoch's checkpoint is this step's
            first = self.at.step_in_epoch if epoch == start else 0
            n_steps = min(self.steps.per_epoch - first, self.steps.total - self.step)
            self.plan = EpochPlan(epoch, first, n_steps, self.steps.per_epoch)
            yield epoch

    def batches(self, loader: Iterable, sampler) -> Iterator:
        """This run's micro-batches of the current epoch (after `sampler.set_epoch`): the
        sampler skips what the steps before the plan's first drew, and the part ends after
        the plan's steps. The clock and the progress bar stop when the batches run out."""
        plan = self.plan
        sampler.start_at(plan.skipped_samples(self.args))
        self.done = 0
        self.bar = self.run.progress(plan.n_steps, f"epoch {plan.epoch}")
        tic = time.perf_counter()
        for batch in itertools.islice(loader, plan.n_steps * self.args.grad_accum):
            self.heartbeat.beat(self.step + 1)  # in step `step + 1`, where the ranks meet
            yield batch
        self.train_time += time.perf_counter() - tic
        self.bar.close()
        self.samples += plan.n_steps * self.global_batch
        self.run.scalars(self.step, samples_per_s=self.samples / max(self.train_time, 1e-9))

    # ---- after each micro-batch, each step, each epoch

    def count(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A micro-batch's loss and accuracy, summed on the device (no wait for it)."""
        self.totals.add_batch(loss, logits, labels)  # a language model: every token
        self.watch.see(loss, self.step + 1)  # step + 1: the one this micro-batch belongs to

    def save(self, epoch: int, step_in_epoch: int) -> None:
        self.checkpoints.save_training(
            self.args,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            epoch=epoch,
            step=self.step,
            step_in_epoch=step_in_epoch,
        )

    def after_step(self) -> None:
        """After every optimizer step, on every rank: the checkpoint when --save-every says so,
        the log line when --log-every does, and the preemption check."""
        args, plan = self.args, self.plan
        self.step += 1
        self.done += 1
        step = self.step
        self.bar.update()
        due = args.save_every and step % args.save_every == 0
        if due and self.done < plan.n_steps:
            self.save(*plan.position(self.done))  # the part's last step is saved at its end
        self.fault(step)
        self.heartbeat.beat(step)  # and past it
        if step % args.log_every == 0 or step == self.steps.total:
            self.final_train = self.totals.reduce()  # a collective: every rank gets here
            self.watch.check(self.final_train["loss"], step)
            lr = self.scheduler.get_last_lr()[0]
            self.run.info(
                "step %d  epoch %d  loss %.4f  acc %.3f%s  lr %.4g",
                step,
                plan.epoch,
                self.final_train["loss"],
                self.final_train["accuracy"],
                bits_text(self.final_train),  # --model gpt: bits per byte
                lr,
            )
            self.run.scalars(step, **scalars("train", self.final_train), lr=lr)
            self.clip.log(self.run, step)  # the pre-clip gradient norms since the last line
        # Every rank asks after every step (a collective), so all stop after the same one; at
        # the part's last step the epoch ends first (eval, its checkpoint).
        if self.preempt.requested() and self.done < plan.n_steps:
            if not due:
                self.save(*plan.position(self.done))
            self.preempt.stop(step)
        self.run.scalars(step, **self.observer.step())  # the step's collectives, the log's too

    def end_epoch(self, metrics: dict) -> None:
        """After the epoch's evaluation (`metrics`; empty with --no-eval): its log line, the
        history, and the checkpoint at the end of the part."""
        epoch = self.plan.epoch
        if metrics:
            self.metrics = metrics
            self.run.info(
                "epoch %d  eval loss %.4f  eval acc %.4f%s  (%d samples)",
                epoch,
                metrics["loss"],
                metrics["accuracy"],
                bits_text(metrics, "eval bpb"),
                metrics["count"],
            )
            self.run.scalars(self.step, **scalars("eval", metrics))
        self.history.append(
            {"epoch": epoch, "step": self.step, **{f"eval_{k}": v for k, v in self.metrics.items()}}
        )
        self.save(*self.plan.position(self.plan.n_steps))

    # ---- the end

    def stopped(self) -> dict | None:
        """After the `with`: when a signal stopped the run, its last line and what main()
        returns (no summary.json: the run is not over); None when the run is complete."""
        if self.preempt.stopped_at is None:
            return None
        self.heartbeat.close()
        stopped = self.preempt.report(self.run.info, self.steps.total, self.run.out_dir)
        self.run.close()
        return stopped

    def finish(self, checksum: str, **identity) -> dict:
        """Write summary.json (rank 0) and return it: `identity` names the script and what
        ran it, `checksum` is param_checksum of the model the checkpoint holds."""
        samples_per_s = self.samples / max(self.train_time, 1e-9)
        summary = {
            **identity,
            "world_size": self.env.world_size,
            "steps": self.step,
            "global_batch": self.global_batch,
            "samples": self.samples,
            "samples_per_s": samples_per_s,
            "final_train_loss": self.final_train.get("loss"),
            "final_train_accuracy": self.final_train.get("accuracy"),
            "final_train_bits_per_byte": self.final_train.get("bits_per_byte"),
            "eval_loss": self.metrics.get("loss"),
            "eval_accuracy": self.metrics.get("accuracy"),
            "eval_bits_per_byte": self.metrics.get("bits_per_byte"),
            "eval_samples": self.metrics.get("count"),
            "param_checksum": checksum,
            "history": self.history,
            **self.clip.summary(),
            **self.observer.summary(),
        }
        self.heartbeat.close()
        self.run.write_summary(summary)
        self.run.info(
            "done: %d steps, %.1f samples/s, checkpoint and summary.json in %s",
            self.step,
            samples_per_s,
            self.run.out_dir,
        )
        self.run.close()
        return summary


def final_model(model: nn.Module, args: argparse.Namespace, env: DistEnv, log) -> tuple:
    """The end of a run: param_checksum of the model the checkpoint holds, and --sample's
    text (rank 0; None elsewhere or when not asked: training/gpt.py)."""
    return param_checksum(model), show_sample(model, args, env.is_main, log)
