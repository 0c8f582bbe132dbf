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
samples. The single-process twin is train_dp.py, where --batch-size is the global batch.

`diff -u train_dp.py train_ddp.py` shows what DDP changes (docs/dp-vs-ddp.md reads it).
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from core.cli import bounded_int, non_negative
from core.dist import BACKENDS, DistEnv, rendezvous, resolve
from core.errors import UsageError, exit_on_error, run_cli
from data.datasets import build_datasets, download_once
from data.sampling import ResumableDistributedSampler, eval_loader, train_loader
from parallel.clip import GradClip
from parallel.factory import add_sync_flags, sync_from_args
from training.checkpoint import CheckpointManager, param_checksum, unwrap
from training.cli import make_parser, validate
from training.faults import fault_hook
from training.guard import LossWatch
from training.heartbeat import Heartbeat
from training.metrics import Totals, evaluate
from training.models import build_model, has_batchnorm
from training.observe import Observer
from training.optim import autocast_dtype, make_optimizer, make_scheduler
from training.preempt import Preemption
from training.runlog import RunLog
from training.sharded import ShardedCheckpoints


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
        type=bounded_int(1, 10**7, "seconds"),  # about 4 months: a timedelta, then C++ ms
        default=600,
        help="seconds a collective may wait for its peers before the job fails",
    )
    g.add_argument(
        "--stall-timeout",
        type=non_negative,
        default=45,
        help="seconds a rank may stay behind the others in the training loop before the job "
        "fails naming it (0: off, only --timeout)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="SyncBatchNorm: batch statistics over the global batch (CUDA only)",
    )
    add_sync_flags(g)  # --sync, --sync-every, --topology: the strategies of parallel/
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # torchrun starts one process per rank and tells it who it is (RANK; LOCAL_RANK, its GPU
    # on this node; WORLD_SIZE) and where to meet (MASTER_ADDR, MASTER_PORT). Backend nccl
    # with CUDA, else gloo. Without torchrun: a world of one.
    env = resolve(args.backend)
    if env.device.type == "cuda":
        # Bind this process to its GPU *before* the group exists: otherwise every rank's
        # NCCL communicator (and stray allocations) land on cuda:0.
        torch.cuda.set_device(env.device)
    if dist.is_initialized():  # a test harness or a notebook made the group: theirs to end
        return train(args, env, [env.device])
    dist.init_process_group(
        backend=env.backend,
        timeout=timedelta(seconds=args.timeout),  # a lost peer fails the job, never hangs it
        device_id=env.device if env.device.type == "cuda" else None,
        **rendezvous(env),  # torchrun's env://; an in-memory store for a world of one
    )
    with exit_on_error(env):  # an error leaves the group alone: torchrun reports the rank
        summary = train(args, env, [env.device])
    dist.destroy_process_group()  # on a clean exit only: every rank gets here
    return summary


def train(args: argparse.Namespace, env: DistEnv, devices: list[torch.device]) -> dict:
    validate(args, env)
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
        download_once(args.dataset, args.data_dir, env.is_main)  # rank 0 downloads, all wait
    data = build_datasets(
        args.dataset,
        args.data_dir,
        seed=args.seed,
        train_size=args.train_size,
        eval_size=args.eval_size,
        augment=args.augment,
        trust_files=args.trust_data_dir,
    )
    pin = env.device.type == "cuda"
    # DistributedSampler: every rank shuffles the same permutation of the epoch and keeps
    # every W-th index of it, so the W shards of one step are the batch one process draws.
    sampler = ResumableDistributedSampler(
        data.train,
        num_replicas=env.world_size,
        rank=env.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    loader = train_loader(
        data.train, args.batch_size, sampler, workers=args.workers, pin_memory=pin
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
    if args.sync in ("ddp", "torch-zero1"):  # torch-zero1: DDP, ZeroRedundancyOptimizer's step
        # Broadcasts rank 0's parameters and buffers now; from here on every backward
        # all-reduces the gradients, bucket by bucket, while it is still computing.
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    sync = sync_from_args(args, model, env)  # --sync: parallel/factory.py (ddp: hands DDP on)
    optimizer = make_optimizer(model, args, sync)  # the sharded --sync modes: this rank's shard
    scheduler = make_scheduler(optimizer, args, total_steps)
    amp_dtype = autocast_dtype(args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    clip = GradClip(args.clip_grad_norm, model, env.device, sync)  # --clip-grad-norm; 0: off

    # ---- resume: the checkpoint names the epoch, and the step inside it, to go on from
    checkpoints = CheckpointManager(out_dir, args.keep, env, run.info, devices, sync=sync)
    if sync.sharded:  # each rank writes its own shard, one folder per checkpoint
        checkpoints = ShardedCheckpoints(out_dir, args.keep, env, sync, log=run.info)
    at = checkpoints.resume(
        args.resume, args, model, optimizer, scheduler, scaler, steps_per_epoch=steps_per_epoch
    )  # checked whole (types, ranges, fit) before anything changes
    step, start_epoch, skip_steps = at.step, at.epoch, at.step_in_epoch
    if (previous := run.finished(at.step, total_steps)) is not None:
        return previous  # re-run of a finished job: its summary.json stays as it is
    fault = fault_hook(env.rank)  # test-only crash/hang injection, off unless TRAIN_FAULT is set
    heartbeat = Heartbeat(env, args.stall_timeout)  # names a rank that stops: training/heartbeat.py

    def save(epoch: int, step_in_epoch: int) -> None:
        checkpoints.save_training(
            args,
            model,
            optimizer,
            scheduler,
            scaler,
            epoch=epoch,
            step=step,
            step_in_epoch=step_in_epoch,
        )

    # ---- train, watched by --trace-comm and --profile (off, and free, unless asked for)
    totals = Totals(env.device)
    watch = LossWatch(args, env.device)  # a non-finite loss stops the run at the next log line
    history, train_time, samples = [], 0.0, 0
    final_train, metrics = {}, {}
    # SIGTERM, --preempt-signal: finish the step, save, leave the `with` (training/preempt.py)
    preempt = Preemption(args.preempt_signal, env)
    with Observer(args, env, model, out_dir) as observer, preempt:
        for epoch in range(start_epoch, args.epochs):
            if step >= total_steps:
                break
            if epoch > start_epoch and preempt.requested():  # came during eval or the save
                preempt.stop(step)  # the epoch's checkpoint is this step's
            sampler.set_epoch(epoch)  # forget this and every epoch repeats the same order
            first = skip_steps if epoch == start_epoch else 0
            sampler.start_at(first * args.grad_accum * args.batch_size)
            n_steps = min(steps_per_epoch - first, total_steps - step)
            batches = itertools.islice(loader, n_steps * args.grad_accum)
            model.train()
            bar = run.progress(n_steps, f"epoch {epoch}")
            tic = time.perf_counter()
            for micro, (images, labels) in enumerate(batches):
                heartbeat.beat(step + 1)  # in step `step + 1`, where the ranks meet each other
                images = images.to(env.device, dtype, non_blocking=True)
                labels = labels.to(env.device, non_blocking=True)
                last_micro = (micro + 1) % args.grad_accum == 0
                # Accumulation micro-steps skip the all-reduce (DDP's model.no_sync()); the
                # last one syncs the sum. Forward too: DDP decides there what backward does.
                with nullcontext() if last_micro else sync.no_sync():
                    with torch.autocast(
                        env.device.type,
                        dtype=amp_dtype or torch.bfloat16,
                        enabled=amp_dtype is not None,
                    ):
                        logits = model(images)
                    loss = F.cross_entropy(logits.to(dtype), labels)  # float32 also under autocast
                    scaler.scale(loss / args.grad_accum).backward()
                totals.add(
                    loss.detach() * labels.numel(),
                    (logits.argmax(1) == labels).sum(),
                    labels.numel(),
                )
                watch.see(loss, step + 1)  # step + 1: the one this micro-batch belongs to
                if not last_micro:
                    continue
                sync.finish_backward()  # the gradients are the average over all ranks from here
                clip(optimizer, scaler)  # --clip-grad-norm: once per step, the step's gradient
                scaler.step(optimizer)
                scaler.update()
                sync.after_step(optimizer)  # local-sgd: every K steps, average the replicas
                optimizer.zero_grad(set_to_none=True)  # after the step: the next one starts at 0
                scheduler.step()
                step += 1
                bar.update()
                done = (micro + 1) // args.grad_accum  # steps of this epoch's slice so far
                due = args.save_every and step % args.save_every == 0
                if due and done < n_steps:
                    save(epoch, first + done)  # the slice's last step is saved after it, below
                fault(step)
                heartbeat.beat(step)  # and past it
                if step % args.log_every == 0 or step == total_steps:
                    final_train = totals.reduce()  # a collective: every rank gets here together
                    watch.check(final_train["loss"], step)
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
                    clip.log(run, step)  # the pre-clip gradient norms since the last line
                # Every rank asks after every step (a collective), so all stop after the same
                # one; at the slice's last step the epoch ends first (eval, its checkpoint).
                if preempt.requested() and done < n_steps:
                    if not due:
                        save(epoch, first + done)
                    preempt.stop(step)
                run.scalars(step, **observer.step())  # the step's collectives, the log's too
            train_time += time.perf_counter() - tic
            bar.close()
            samples += n_steps * global_batch
            run.scalars(step, samples_per_s=samples / max(train_time, 1e-9))

            if not args.no_eval:
                # Not through DDP: its forward may broadcast buffers, a collective, and the
                # ranks' eval shards differ in length. Every rank evaluates the model it saves.
                with sync.consolidated(optimizer):
                    metrics = evaluate(unwrap(sync.model), evaluation, env.device, dtype, amp_dtype)
                run.info(
                    "epoch %d  eval loss %.4f  eval acc %.4f  (%d samples)",
                    epoch,
                    metrics["loss"],
                    metrics["accuracy"],
                    metrics["count"],
                )
                run.scalars(
                    step, **{"eval/loss": metrics["loss"], "eval/accuracy": metrics["accuracy"]}
                )
            history.append(
                {"epoch": epoch, "step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
            )
            done_epoch = n_steps == steps_per_epoch - first
            save(epoch + 1 if done_epoch else epoch, 0 if done_epoch else first + n_steps)

    if preempt.stopped_at is not None:  # no summary.json: the run is not over
        stopped = preempt.report(run.info, total_steps, out_dir)
        run.close()
        return stopped

    with sync.consolidated(optimizer):
        checksum = param_checksum(sync.model)  # fsdp2: a plain copy, inside consolidated()
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
        **clip.summary(),
        **observer.summary(),
    }
    heartbeat.close()
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
