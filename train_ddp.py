"""Data-parallel training with DistributedDataParallel: one process per rank, under torchrun.

    # two CPU processes on this machine (gloo), synthetic data: the cluster simulation
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 train_ddp.py
    # every GPU of this node (nccl)
    torchrun --standalone --nproc-per-node gpu train_ddp.py --dataset cifar10 --data-dir data
    # no launcher at all: a world of one
    python train_ddp.py --epochs 1

Every rank runs this whole file. They build the same model from the same seed, DDP
broadcasts rank 0's copy anyway, and each rank trains on its own shard of every batch;
during backward DDP averages the gradients across ranks, so after optimizer.step() all
replicas hold the same parameters again.

--batch-size is *per rank*: one optimizer step sees batch_size x world_size x grad_accum
samples. The single-process twin is train_dp.py, where --batch-size is the global batch;
`diff -u train_dp.py train_ddp.py` shows what DDP changes.
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import ExitStack, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from comm.dist import BACKENDS, DistEnv, UsageError, distributed, run_cli
from comm.sync import SYNC_MODES, make_sync
from comm.tracer import CommTracer, make_profiler
from data.datasets import build_datasets, download_once
from data.sampling import eval_loader, set_epoch, train_loader
from training.checkpoint import CheckpointManager, param_checksum, training_state, unwrap
from training.cli import make_parser, positive, validate
from training.faults import fault_hook
from training.metrics import Totals, evaluate
from training.models import build_model, has_batchnorm
from training.optim import autocast_dtype, make_optimizer, make_scheduler
from training.runlog import RunLog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(
        description=__doc__,
        batch_size_help="samples per rank per micro-step (global batch: this x world size "
        "x --grad-accum)",
        default_batch_size=32,
        default_out_dir="runs/ddp",
    )
    g = parser.add_argument_group("distributed")
    g.add_argument(
        "--backend",
        default=None,
        choices=BACKENDS,
        help="process-group backend (default: nccl with CUDA, else gloo)",
    )
    g.add_argument(
        "--timeout",
        type=positive,
        default=600,
        help="seconds a collective may wait for its peers before the job fails",
    )
    g.add_argument(
        "--sync",
        default="ddp",
        choices=SYNC_MODES,
        help="who synchronises gradients: DDP's reducer or one of comm/sync.py",
    )
    g.add_argument(
        "--sync-every",
        type=positive,
        default=None,
        metavar="K",
        help="--sync local-sgd only: average the replicas every K optimizer steps (unset: 4)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm: batch statistics over the global batch (CUDA only)",
    )
    o = parser.add_argument_group("observability")
    o.add_argument(
        "--trace-comm",
        action="store_true",
        help="record every collective's bytes and time (comm/tracer.py): TensorBoard comm/* "
        "and the 'comm' key of summary.json",
    )
    o.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler trace of steps 3-5 in <out-dir>/profile/ (chrome://tracing)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with distributed(args.backend, timedelta(seconds=args.timeout)) as env, ExitStack() as cleanup:
        return train(args, env, cleanup)


def train(args: argparse.Namespace, env: DistEnv, cleanup: ExitStack) -> dict:
    """The whole run on this rank. What it starts that must end even if the run fails (the
    tracer's patched collectives, the profiler) is left to `cleanup`."""
    validate(args, cuda=env.device.type == "cuda")
    out_dir = Path(args.out_dir)
    run = RunLog(env, out_dir, args)  # threads, first log line; refuses a used --out-dir
    global_batch = args.batch_size * env.world_size * args.grad_accum
    run.info(
        "%d rank(s), %s on %s, sync %s; global batch %d = %d per rank x %d rank(s) x %d micro",
        env.world_size,
        env.backend,
        env.device,
        args.sync,
        global_batch,
        args.batch_size,
        env.world_size,
        args.grad_accum,
    )

    # ---- data: every rank builds the same dataset; the sampler hands each its shard
    if args.download:
        download_once(args.dataset, args.data_dir, env.is_main)
    data = build_datasets(
        args.dataset,
        args.data_dir,
        seed=args.seed,
        train_size=args.train_size,
        eval_size=args.eval_size,
        augment=args.augment,
    )
    pin = env.device.type == "cuda"
    loader = train_loader(
        data.train,
        args.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=args.seed,
        workers=args.workers,
        pin_memory=pin,
    )
    evaluation = eval_loader(
        data.eval,
        args.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        workers=args.workers,
        pin_memory=pin,
    )
    steps_per_epoch = len(loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise UsageError(
            f"--grad-accum {args.grad_accum} is more than the {len(loader)} batches per epoch"
        )
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    # ---- model: same seed on every rank, so every replica starts equal
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.in_channels, data.image_size, data.num_classes)
    if args.sync_bn:
        if env.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU")
        if not has_batchnorm(model):
            raise UsageError(f"--sync-bn: model {args.model} has no BatchNorm layer")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dtype = getattr(torch, args.dtype)  # float32; float64 for exact comparisons
    model = model.to(env.device, dtype)
    # wraps the model in DDP for --sync ddp
    sync = make_sync(args.sync, model, env, sync_every=args.sync_every)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, total_steps)
    amp_dtype = autocast_dtype(args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # ---- resume: the checkpoint names the epoch, and the step inside it, to go on from
    checkpoints = CheckpointManager(out_dir, args.keep, env, log=run.info)
    at = checkpoints.resume(args.resume, args, model, optimizer, scheduler, scaler)
    sync.load_rank_state(optimizer, at.rank_state, at.step)  # local-sgd: this rank's replica
    step, start_epoch, skip_steps = at.step, at.epoch, at.step_in_epoch
    if (previous := run.finished(at.step, total_steps)) is not None:
        return previous  # re-run of a finished job: its summary.json stays as it is
    fault = fault_hook(env.rank)  # test-only crash/hang injection, off unless TRAIN_FAULT is set

    def save(epoch: int, step_in_epoch: int) -> None:
        mine = sync.rank_state(optimizer)  # local-sgd: this rank's own replica
        with sync.consolidated(optimizer):  # every rank holds the one model to save
            state = training_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch=epoch,
                step=step,
                step_in_epoch=step_in_epoch,
                world_size=env.world_size,
                args=args,
                devices=[env.device],
            )
            checkpoints.save(state, mine)

    # ---- observability: both stay off (and cost nothing) unless asked for
    tracer = cleanup.enter_context(CommTracer(enabled=args.trace_comm))
    tracer.attach(sync.model)  # a comm hook on DDP's reducer, which bypasses dist.*
    profiler = make_profiler(out_dir, env.rank, args.profile)
    if profiler:
        cleanup.enter_context(profiler)

    # ---- train
    totals = Totals(env.device)
    history, train_time, samples = [], 0.0, 0
    final_train, metrics = {}, {}
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        set_epoch(loader, epoch, args.seed, env.rank)  # forget this and every epoch repeats
        first = skip_steps if epoch == start_epoch else 0
        loader.sampler.start_at(first * args.grad_accum * args.batch_size)
        n_steps = min(steps_per_epoch - first, total_steps - step)
        batches = itertools.islice(loader, n_steps * args.grad_accum)
        sync.model.train()
        bar = run.progress(n_steps, f"epoch {epoch}")
        tic = time.perf_counter()
        for micro, (images, labels) in enumerate(batches):
            images = images.to(env.device, dtype, non_blocking=True)
            labels = labels.to(env.device, non_blocking=True)
            last_micro = (micro + 1) % args.grad_accum == 0
            # Accumulation micro-steps skip the all-reduce; the last one syncs the sum.
            with nullcontext() if last_micro else sync.no_sync():
                with torch.autocast(
                    env.device.type,
                    dtype=amp_dtype or torch.bfloat16,
                    enabled=amp_dtype is not None,
                ):
                    logits = sync.model(images)
                loss = F.cross_entropy(logits.to(dtype), labels)  # float32 also under autocast
                scaler.scale(loss / args.grad_accum).backward()
            totals.add(
                loss.detach() * labels.numel(), (logits.argmax(1) == labels).sum(), labels.numel()
            )
            if not last_micro:
                continue
            sync.finish_backward()  # gradients are the average over all ranks from here on
            scaler.step(optimizer)
            scaler.update()
            sync.after_step(optimizer)
            optimizer.zero_grad(set_to_none=True)  # after the step: the next one starts at 0
            scheduler.step()
            step += 1
            bar.update()
            done = (micro + 1) // args.grad_accum  # steps of this epoch's slice so far
            if args.save_every and step % args.save_every == 0 and done < n_steps:
                save(epoch, first + done)  # the slice's last step is saved after it, below
            fault(step)
            if step % args.log_every == 0 or step == total_steps:
                final_train = totals.reduce()  # a collective: every rank gets here together
                run.info(
                    "step %d  epoch %d  loss %.4f  acc %.3f  lr %.4g",
                    step,
                    epoch,
                    final_train["loss"],
                    final_train["accuracy"],
                    scheduler.get_last_lr()[0],
                )
                run.scalars(
                    step,
                    **{
                        "train/loss": final_train["loss"],
                        "train/accuracy": final_train["accuracy"],
                        "lr": scheduler.get_last_lr()[0],
                    },
                )
            run.scalars(step, **tracer.end_step())  # the step's collectives, the log's included
            if profiler:
                profiler.step()
        train_time += time.perf_counter() - tic
        bar.close()
        samples += n_steps * global_batch
        run.scalars(step, samples_per_s=samples / max(train_time, 1e-9))

        if not args.no_eval:
            with sync.consolidated(optimizer):  # every rank evaluates the model it saves
                metrics = evaluate(unwrap(sync.model), evaluation, env.device, dtype, amp_dtype)
            run.info(
                "epoch %d  eval loss %.4f  eval acc %.4f  (%d samples)",
                epoch,
                metrics["loss"],
                metrics["accuracy"],
                metrics["count"],
            )
            run.scalars(
                step,
                **{
                    "eval/loss": metrics["loss"],
                    "eval/accuracy": metrics["accuracy"],
                },
            )
        history.append(
            {"epoch": epoch, "step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
        )
        done_epoch = n_steps == steps_per_epoch - first
        save(epoch + 1 if done_epoch else epoch, 0 if done_epoch else first + n_steps)

    with sync.consolidated(optimizer):
        checksum = param_checksum(sync.model)
    summary = {
        "script": "train_ddp.py",
        "world_size": env.world_size,
        "backend": env.backend,
        "sync": args.sync,
        "steps": step,
        "global_batch": global_batch,
        "samples": samples,
        "samples_per_s": samples / max(train_time, 1e-9),
        "final_train_loss": final_train.get("loss"),
        "final_train_accuracy": final_train.get("accuracy"),
        "eval_loss": metrics.get("loss"),
        "eval_accuracy": metrics.get("accuracy"),
        "eval_samples": metrics.get("count"),
        "param_checksum": checksum,  # of the model the checkpoint holds
        "history": history,
    }
    if args.trace_comm:
        summary["comm"] = tracer.summary()
    run.write_summary(summary)
    run.info(
        "done: %d steps, %.1f samples/s, checkpoint and summary.json in %s",
        step,
        summary["samples_per_s"],
        out_dir,
    )
    run.close()
    return summary


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
