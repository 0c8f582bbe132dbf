"""Data-parallel training with DistributedDataParallel: one process per rank, under torchrun.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 train_ddp.py  # 2 CPU ranks, gloo
    torchrun --standalone --nproc-per-node gpu train_ddp.py --dataset cifar10 --data-dir data
    python train_ddp.py --epochs 1  # no launcher: a world of one

Every rank runs this whole file, on its own shard of every batch, from the same model (DDP
broadcasts rank 0's anyway); during backward DDP averages the gradients across ranks, so
after optimizer.step() every replica holds the same parameters again.
--batch-size is *per rank*: the global batch is batch_size x world_size;
an optimizer step sees the global batch x --grad-accum samples.

`diff -u train_dp.py train_ddp.py` shows what DDP changes (docs/dp-vs-ddp.md reads it).
"""

from __future__ import annotations

import argparse

from core.cli import BACKENDS, bounded_int, parse_or_exit
from training.cli import add_extension_flags, make_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(
        description=__doc__,
        batch_size_help="samples per rank per micro-step (global batch: this x world size)",
        default_batch_size=32,
        default_out_dir="runs/ddp",
    )
    g = parser.add_argument_group("parallelism")
    g.add_argument("--backend", choices=BACKENDS, help="default: nccl with CUDA, else gloo")
    g.add_argument(
        "--timeout",
        type=bounded_int(1, 10**7, "seconds"),  # about 4 months: a timedelta, then C++ ms
        default=600,
        help="seconds a collective may wait for its peers before the job fails",
    )
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm: global batch statistics")
    add_extension_flags(g)  # not DDP's: --sync (parallel/), --topology, --stall-timeout, ...
    return parser.parse_args(argv)


if __name__ == "__main__":  # a bad flag: one line at once, before torch's seconds of loading
    parse_or_exit(parse_args)

from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from core.dist import DistEnv, rendezvous, resolve
from core.errors import exit_on_error, run_cli
from data.datasets import build_datasets, download_once
from data.sampling import ResumableDistributedSampler, eval_loader, train_loader
from parallel.clip import GradClip
from parallel.factory import ddp_kwargs, sync_from_args
from training.checkpoint import unwrap
from training.cli import validate
from training.compiled import maybe_compile
from training.fault_tolerant import run_replica
from training.faults import fault_hook
from training.loop import Steps, TrainLoop, final_model, make_checkpoints
from training.metrics import evaluate, loss_fn
from training.models import checkpoint_activations, model_from_args, model_input
from training.optim import autocast_dtype, make_optimizer, make_scheduler
from training.runlog import RunLog


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.fault_tolerance:  # one replica of a job that outlives replicas: no group here
        return run_replica(args)
    # torchrun's env: who this rank is (RANK; LOCAL_RANK, its GPU on this node; WORLD_SIZE)
    # and where to meet (MASTER_ADDR, MASTER_PORT). Without torchrun: a world of one.
    env = resolve(args.backend)  # backend nccl with CUDA, else gloo
    if env.device.type == "cuda":  # before the group exists, or every rank's NCCL uses cuda:0
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
        context=args.context,  # --model gpt's window of bytes
    )
    pin = env.device.type == "cuda"
    # DistributedSampler: each rank keeps every W-th index of the epoch's shared permutation.
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
    steps = Steps.count(len(loader), args)  # per epoch, and in all (--epochs, --max-steps)

    # ---- model: same seed on every rank, so every replica starts equal
    torch.manual_seed(args.seed)
    model = model_from_args(args, data)  # --model, sized for the data (gpt: its flags)
    if args.activation_checkpointing:  # recompute each block in backward: training/models.py
        checkpoint_activations(model)
    if args.sync_bn:  # batch statistics over the global batch (CUDA only: validate() checks)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dtype = getattr(torch, args.dtype)  # float32; float64 for exact comparisons
    model = model.to(env.device, dtype)
    if args.sync in ("ddp", "torch-zero1"):  # torch-zero1: DDP, ZeroRedundancyOptimizer's step
        # Broadcasts rank 0's weights now; then backward all-reduces gradient buckets as they fill
        model = DDP(model, device_ids=env.device_ids, **ddp_kwargs(args))  # this rank's GPU
    maybe_compile(model, args)  # --compile, once the model is wrapped: training/compiled.py
    sync = sync_from_args(args, model, env)  # --sync: parallel/factory.py (ddp: hands DDP on)
    optimizer = make_optimizer(model, args, sync)  # the sharded --sync modes: this rank's shard
    scheduler = make_scheduler(optimizer, args, steps.total)
    amp_dtype = autocast_dtype(args.amp)
    autocast = torch.autocast(
        env.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
    )  # --amp; a no-op without it
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    clip = GradClip(args.clip_grad_norm, model, env.device, sync)  # --clip-grad-norm; 0: off

    # ---- resume: the checkpoint names the epoch, and the step inside it, to go on from
    checkpoints = make_checkpoints(out_dir, args.keep, env, run.info, devices, sync)
    at = checkpoints.resume(
        args.resume, args, model, optimizer, scheduler, scaler, steps_per_epoch=steps.per_epoch
    )  # checked whole (types, ranges, fit) before anything changes
    if (previous := run.finished(at.step, steps.total)) is not None:
        return previous  # re-run of a finished job: its summary.json stays as it is

    # ---- train: the step in plain sight; training/loop.py keeps the books around it
    fault = fault_hook(env.rank)  # test-only crash/hang injection, off unless TRAIN_FAULT is set
    loop = TrainLoop(
        args, env, run, steps, at, checkpoints, clip, fault, model, optimizer, scheduler, scaler
    )
    with loop:  # --trace-comm, --profile; SIGTERM: finish the step, save, leave the `with`
        for epoch in loop.epochs():  # from the checkpoint's step to --epochs or --max-steps
            sampler.set_epoch(epoch)  # forget this and every epoch repeats the same order
            model.train()
            for micro, (images, labels) in enumerate(loop.batches(loader, sampler)):
                images = model_input(images, env.device, dtype)  # text stays integer byte ids
                labels = labels.to(env.device, non_blocking=True)
                last_micro = (micro + 1) % args.grad_accum == 0
                # Accumulation micro-steps skip the all-reduce (DDP's model.no_sync()); the
                # last one syncs the sum. Forward too: DDP decides there what backward does.
                with nullcontext() if last_micro else sync.no_sync():
                    with autocast:
                        logits = model(images)
                    loss = loss_fn(logits.to(dtype), labels)  # float32 also under autocast
                    scaler.scale(loss / args.grad_accum).backward()
                loop.count(loss, logits, labels)  # summed on the device, read at log lines
                if not last_micro:
                    continue
                sync.finish_backward()  # the gradients are the average over all ranks from here
                clip(optimizer, scaler)  # --clip-grad-norm: once per step, the step's gradient
                scaler.step(optimizer)
                scaler.update()
                sync.after_step(optimizer)  # local-sgd: every K steps, average the replicas
                optimizer.zero_grad(set_to_none=True)  # after the step: the next one starts at 0
                scheduler.step()
                loop.after_step()  # save when due, the log line, the preemption check
            metrics = {}  # --no-eval
            if not args.no_eval:
                # Not through DDP: its forward may broadcast buffers, a collective, and the
                # ranks' eval shards differ in length. Every rank evaluates the model it saves.
                with sync.consolidated(optimizer):
                    metrics = evaluate(unwrap(sync.model), evaluation, env.device, dtype, amp_dtype)
            loop.end_epoch(metrics)  # the eval log line, the checkpoint at the epoch's end
    if (stopped := loop.stopped()) is not None:
        return stopped  # preempted: no summary.json, the run is not over

    with sync.consolidated(optimizer):
        checksum, sample = final_model(sync.model, args, env, run.info)  # fsdp2: a plain copy
    return loop.finish(
        checksum,  # of the model the checkpoint holds
        sample=sample,  # --sample N: what the trained gpt writes
        script=Path(__file__).name,
        backend=env.backend,
        sync=args.sync,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
