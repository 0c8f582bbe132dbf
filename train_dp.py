"""Data-parallel training with nn.DataParallel: one process drives every visible GPU.

    python train_dp.py --dataset cifar10 --data-dir data  # every GPU of this machine
    python train_dp.py --gpus 0,1  # two of them
    python train_dp.py --epochs 1  # no GPU: the CPU, step for step train_ddp.py's 2-rank run

Every forward, DataParallel copies the model from the first device to the others, splits
the batch between the copies, runs them in one thread each and gathers their outputs; backward
sums their gradients into the one model (parallel/dataparallel.py: the same in a page).
--batch-size is the *global* batch, which DataParallel splits between the devices;
an optimizer step sees the global batch x --grad-accum samples.

`diff -u train_dp.py train_ddp.py` shows what DDP changes (docs/dp-vs-ddp.md reads it).
"""

from __future__ import annotations

import argparse

from core.cli import parse_or_exit
from training.cli import gpu_list, make_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(
        description=__doc__,
        batch_size_help="samples per micro-step, split between the devices (the global batch)",
        default_batch_size=64,
        default_out_dir="runs/dp",
    )
    g = parser.add_argument_group("parallelism")
    g.add_argument(
        "--gpus",
        type=gpu_list,
        default="all",
        help="CUDA devices to spread each batch over: all, none (the CPU) or indices as 0,1",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":  # a bad flag: one line at once, before torch's seconds of loading
    parse_or_exit(parse_args)

import os
from pathlib import Path

import torch

from core.dist import DistEnv
from core.errors import UsageError, run_cli
from data.datasets import build_datasets
from data.sampling import ResumableDistributedSampler, eval_loader, train_loader
from parallel.clip import GradClip
from training.cli import validate
from training.compiled import maybe_compile
from training.devices import pick_devices
from training.faults import fault_hook
from training.loop import Steps, TrainLoop, final_model, make_checkpoints
from training.metrics import evaluate, loss_fn
from training.models import DataParallel, checkpoint_activations, model_from_args, model_input
from training.optim import autocast_dtype, make_optimizer, make_scheduler
from training.runlog import RunLog


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("train_dp.py is one process for all GPUs; under torchrun use train_ddp.py")
    devices = pick_devices(args.gpus)  # --gpus, or every visible GPU; [cpu] without one
    env = DistEnv(  # one process is the whole job: a world of one, on the batches' device
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
        context=args.context,  # --model gpt's window of bytes
    )
    pin = env.device.type == "cuda"
    # A world of one: every sample, in the seeded order that train_ddp.py's ranks deal out.
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
        rank=env.rank,
        world_size=env.world_size,
        workers=args.workers,
        pin_memory=pin,
    )
    steps = Steps.count(len(loader), args)  # per epoch, and in all (--epochs, --max-steps)

    # ---- model: one copy, on the first device; DataParallel re-copies it every forward
    torch.manual_seed(args.seed)
    model = model_from_args(args, data)  # --model, sized for the data (gpt: its flags)
    if args.activation_checkpointing:  # recompute each block in backward: training/models.py
        checkpoint_activations(model)
    dtype = getattr(torch, args.dtype)  # float32; float64 for exact comparisons
    model = model.to(env.device, dtype)
    if len(devices) > 1:
        # nn.DataParallel whose replica threads keep this thread's autocast dtype (--amp bf16)
        model = DataParallel(model, device_ids=devices, output_device=env.device)
        run.info("nn.DataParallel over %d GPUs, outputs gathered on %s", len(devices), env.device)
    elif env.device.type == "cuda":
        run.info("one GPU: no DataParallel wrapper, there is nothing to split a batch across")
    else:
        run.info("no GPU: training the plain module on the CPU (DataParallel needs GPUs)")
    maybe_compile(model, args)  # --compile, once the model is wrapped: training/compiled.py
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, steps.total)
    amp_dtype = autocast_dtype(args.amp)
    autocast = torch.autocast(
        env.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
    )  # --amp; a no-op without it
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    clip = GradClip(args.clip_grad_norm, model, env.device)  # --clip-grad-norm; 0: off

    # ---- resume: the checkpoint names the epoch, and the step inside it, to go on from
    checkpoints = make_checkpoints(out_dir, args.keep, env, run.info, devices)
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
            sampler.set_epoch(epoch)  # DistributedSampler's order: reshuffled only when told
            model.train()
            for micro, (images, labels) in enumerate(loop.batches(loader, sampler)):
                images = model_input(images, env.device, dtype)  # text stays integer byte ids
                labels = labels.to(env.device, non_blocking=True)
                last_micro = (micro + 1) % args.grad_accum == 0
                # No all-reduce to skip on accumulation micro-steps: the gradients just add up.
                with autocast:
                    logits = model(images)  # scatter, replicate, parallel forward, gather
                loss = loss_fn(logits.to(dtype), labels)  # float32 also under autocast
                scaler.scale(loss / args.grad_accum).backward()
                loop.count(loss, logits, labels)  # summed on the device, read at log lines
                if not last_micro:
                    continue
                clip(optimizer, scaler)  # --clip-grad-norm: once per step, the step's gradient
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)  # after the step: the next one starts at 0
                scheduler.step()
                loop.after_step()  # save when due, the log line, the preemption check
            metrics = {}  # --no-eval
            if not args.no_eval:
                # No collective inside, so the wrapper may stay: eval batches are split too.
                metrics = evaluate(model, evaluation, env.device, dtype, amp_dtype)
            loop.end_epoch(metrics)  # the eval log line, the checkpoint at the epoch's end
    if (stopped := loop.stopped()) is not None:
        return stopped  # preempted: no summary.json, the run is not over

    checksum, sample = final_model(model, args, env, run.info)  # --sample N: gpt's text
    return loop.finish(
        checksum,  # of the model the checkpoint holds
        sample=sample,  # --sample N: what the trained gpt writes
        script=Path(__file__).name,
        backend=None,  # no process group: the replicas are threads of this process
        devices=[str(d) for d in devices],
        sync="dataparallel" if len(devices) > 1 else "none",
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
