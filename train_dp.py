"""Data-parallel training with nn.DataParallel: one process drives every visible GPU.

    # every GPU of this machine, one process, no launcher
    python train_dp.py --dataset cifar10 --data-dir data
    # two of them
    python train_dp.py --gpus 0,1
    # no GPU: the plain module on the CPU; step for step the same run as
    # `torchrun --nproc-per-node 2 train_ddp.py --epochs 1` (2 ranks x 32 = 64 per step)
    python train_dp.py --epochs 1

One process holds the model on the first device. Every forward, DataParallel copies it to
the other devices, splits the batch between the copies, runs them in one thread each and
gathers their outputs on the first device; backward sends each copy's gradients back into
the one set of parameters, where autograd sums them. parallel/dataparallel.py does the same
in a page of code; docs/dp-vs-ddp.md says where the time goes and why DDP is faster.

--batch-size is the *global* batch: one optimizer step sees batch_size x grad_accum
samples, however many devices share them. The multi-process twin is train_ddp.py, where
--batch-size is per rank.

`diff -u train_dp.py train_ddp.py` shows what DDP changes (docs/dp-vs-ddp.md reads it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.dist import DistEnv
from core.errors import UsageError, run_cli
from data.datasets import build_datasets
from data.sampling import ResumableDistributedSampler, eval_loader, train_loader
from parallel.clip import GradClip
from training.checkpoint import CheckpointManager, param_checksum
from training.cli import make_parser, validate
from training.devices import gpu_list, pick_devices
from training.faults import fault_hook
from training.guard import LossWatch
from training.metrics import Totals, evaluate
from training.models import build_model
from training.observe import Observer
from training.optim import autocast_dtype, make_optimizer, make_scheduler
from training.preempt import Preemption
from training.runlog import RunLog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(
        description=__doc__,
        batch_size_help="samples per micro-step, split between the devices (global batch: "
        "this x --grad-accum)",
        default_batch_size=64,
        default_out_dir="runs/dp",
    )
    g = parser.add_argument_group("devices")
    g.add_argument(
        "--gpus",
        type=gpu_list,
        default="all",
        help="CUDA devices to spread each batch over: all, none (the CPU) or indices "
        "such as 0,1; the first one holds the model and gathers the outputs",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError(
            "train_dp.py is one process for all devices; under torchrun use train_ddp.py"
        )
    devices = pick_devices(args.gpus)  # --gpus, or every visible GPU; [cpu] without one
    # One process is the whole job: a world of one, whose device is where batches arrive.
    env = DistEnv(
        rank=0, local_rank=0, world_size=1, local_world_size=1, backend="none", device=devices[0]
    )
    return train(args, env, devices)


def train(args: argparse.Namespace, env: DistEnv, devices: list[torch.device]) -> dict:
    validate(args, env)
    out_dir = Path(args.out_dir)
    run = RunLog(env, out_dir, args)  # threads, first log line; refuses a used --out-dir
    global_batch = args.batch_size * env.world_size * args.grad_accum
    run.info(
        "one process, %d device(s): %s; global batch %d = %d x %d micro",
        len(devices),
        ", ".join(str(d) for d in devices),
        global_batch,
        args.batch_size,
        args.grad_accum,
    )

    # ---- data: one loader, no sharding; DataParallel splits every batch itself
    data = build_datasets(
        args.dataset,
        args.data_dir,
        seed=args.seed,
        train_size=args.train_size,
        eval_size=args.eval_size,
        download=args.download,
        augment=args.augment,
        trust_files=args.trust_data_dir,
    )
    pin = env.device.type == "cuda"
    # A world of one: every sample, in the epoch's seeded order, which is the order that
    # train_ddp.py's ranks deal out between them (so both scripts take the same steps).
    sampler = ResumableDistributedSampler(
        data.train,
        num_replicas=1,
        rank=0,
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
        rank=0,
        world_size=1,
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

    # ---- model: one copy, on the first device; DataParallel re-copies it every forward
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.in_channels, data.image_size, data.num_classes)
    dtype = getattr(torch, args.dtype)  # float32; float64 for exact comparisons
    model = model.to(env.device, dtype)
    if len(devices) > 1:
        model = nn.DataParallel(model, device_ids=devices, output_device=env.device)
        run.info("nn.DataParallel over %d GPUs, outputs gathered on %s", len(devices), env.device)
    elif env.device.type == "cuda":
        run.info("one GPU: no DataParallel wrapper, there is nothing to split a batch across")
    else:
        run.info("no GPU: training the plain module on the CPU (DataParallel needs GPUs)")
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, total_steps)
    amp_dtype = autocast_dtype(args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    clip = GradClip(args.clip_grad_norm, model, env.device)  # --clip-grad-norm; 0: off

    # ---- resume: the checkpoint names the epoch, and the step inside it, to go on from
    checkpoints = CheckpointManager(out_dir, args.keep, env, run.info, devices)
    at = checkpoints.resume(
        args.resume, args, model, optimizer, scheduler, scaler, steps_per_epoch=steps_per_epoch
    )  # checked whole (types, ranges, fit) before anything changes
    step, start_epoch, skip_steps = at.step, at.epoch, at.step_in_epoch
    if (previous := run.finished(at.step, total_steps)) is not None:
        return previous  # re-run of a finished job: its summary.json stays as it is
    fault = fault_hook(env.rank)  # test-only crash/hang injection, off unless TRAIN_FAULT is set

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
                images = images.to(env.device, dtype, non_blocking=True)
                labels = labels.to(env.device, non_blocking=True)
                last_micro = (micro + 1) % args.grad_accum == 0
                # Nothing to skip on accumulation micro-steps: there is no all-reduce, each
                # replica's gradients land in the one set of parameters during backward.
                with torch.autocast(
                    env.device.type,
                    dtype=amp_dtype or torch.bfloat16,
                    enabled=amp_dtype is not None,
                ):
                    logits = model(images)  # scatter, replicate, parallel forward, gather
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
                clip(optimizer, scaler)  # --clip-grad-norm: once per step, the step's gradient
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)  # after the step: the next one starts at 0
                scheduler.step()
                step += 1
                bar.update()
                done = (micro + 1) // args.grad_accum  # steps of this epoch's slice so far
                due = args.save_every and step % args.save_every == 0
                if due and done < n_steps:
                    save(epoch, first + done)  # the slice's last step is saved after it, below
                fault(step)
                if step % args.log_every == 0 or step == total_steps:
                    final_train = totals.reduce()
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
                # No collective inside, so the wrapper may stay: eval batches are split too.
                metrics = evaluate(model, evaluation, env.device, dtype, amp_dtype)
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

    checksum = param_checksum(model)
    summary = {
        "script": "train_dp.py",
        "world_size": env.world_size,
        "backend": None,  # no process group: the replicas are threads of this process
        "devices": [str(d) for d in devices],
        "sync": "dataparallel" if len(devices) > 1 else "none",
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
