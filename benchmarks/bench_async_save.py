"""What --async-save buys: the training stall of a checkpoint written synchronously, against
the snapshot of one written in the background, and what the write costs the steps it overlaps.

    python -m benchmarks.bench_async_save                  # resnet18, CPU, 1 intra-op thread
    python -m benchmarks.bench_async_save --model gpt --steps 30 --save-every 6

One process trains the model (synthetic data: the cost of a step does not depend on the
values) through three segments of `--steps` optimizer steps each, `--rounds` times, the
segments interleaved so that a change in the machine's load hits all three alike:

- none: no checkpoint at all, the step time of reference;
- sync: a checkpoint every `--save-every` steps through CheckpointManager.save_training, the
  write on the training thread (training/checkpoint/): its stall is the save call's time;
- async: the same with --async-save (training/checkpoint/background.py): the save call takes
  the snapshot (and waits for a previous write still in flight, at most one), a thread writes.
  Each step is sorted by whether a write was in flight while it ran: the ratio of the median
  step with a write in flight to the median step without one is the overlap's cost (goal:
  at most 1.1).

Checkpoints go to a temporary folder on the --out-dir's filesystem (the disk the real runs
write to), deleted at the end; the table goes to stdout and its rows to
<out-dir>/bench_async_save.csv. On a shared machine timings are noisy: read the ratios of
one run. On CPU the writer thread needs a core of its own besides the training's threads.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

from core.cli import Parser, positive
from core.dist import DistEnv
from core.errors import UsageError, run_cli
from training.checkpoint import CheckpointManager
from training.gpt import GPT
from training.models import MODELS, build_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--model", default="resnet18", choices=[*MODELS, "gpt"], help="what to train")
    p.add_argument("--batch-size", type=positive, default=4, help="samples per step")
    p.add_argument("--steps", type=positive, default=10, help="optimizer steps per segment")
    p.add_argument("--save-every", type=positive, default=5, help="steps between checkpoints")
    p.add_argument("--rounds", type=positive, default=2, help="times each segment runs")
    p.add_argument("--threads", type=positive, default=1, help="torch's intra-op threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--out-dir", default="bench_out", help="where bench_async_save.csv goes")
    return p.parse_args(argv)


class Trainer:
    """A model, AdamW (two moments per parameter: a checkpoint three times the weights) and
    one fixed synthetic batch."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        if args.model == "gpt":  # 8 blocks of width 512: 26 M parameters, 100 MB of weights
            self.model = GPT(vocab=256, context=128, layers=8, width=512, heads=8)
            self.x = torch.randint(0, 256, (args.batch_size, 128))
            self.y = torch.randint(0, 256, (args.batch_size, 128))
        else:  # CIFAR-shaped images, 10 classes
            self.model = build_model(args.model, 3, 32, 10)
            self.x = torch.randn(args.batch_size, 3, 32, 32)
            self.y = torch.randint(0, 10, (args.batch_size,))
        self.model.to(device)
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)

    def step(self) -> None:
        logits = self.model(self.x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.device.type == "cuda":  # the step's time, not the time to queue it
            torch.cuda.synchronize(self.device)


def segment(trainer: Trainer, kind: str, args, env: DistEnv, folder: Path, first: int) -> dict:
    """`args.steps` steps: each step's seconds, with a write in flight or not, and each save
    call's seconds."""
    manager = None
    if kind != "none":
        manager = CheckpointManager(folder / kind, keep=2, env=env)
        if kind == "async":
            manager.enable_async()
    run_args = Namespace(model=args.model, batch_size=args.batch_size, lr=1e-4)
    steps: dict[bool, list[float]] = {False: [], True: []}
    saves: list[float] = []
    for n in range(first, first + args.steps):
        busy = manager is not None and manager.background is not None and manager.background.busy()
        tic = time.perf_counter()
        trainer.step()
        seconds = time.perf_counter() - tic
        busy = busy or (manager is not None and manager.background is not None
                        and manager.background.busy())  # fmt: skip
        steps[busy].append(seconds)
        if manager is not None and (n + 1) % args.save_every == 0:
            tic = time.perf_counter()
            manager.save_training(
                run_args, trainer.model, trainer.optimizer, trainer.scheduler, None,
                epoch=0, step=n + 1, step_in_epoch=n + 1,
            )  # fmt: skip
            saves.append(time.perf_counter() - tic)
    if manager is not None:
        manager.settle()
    return {"steps": steps, "saves": saves}


def _ms(values: list[float]) -> float | None:
    return 1e3 * statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is visible")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
                  device=device)  # fmt: skip
    trainer = Trainer(args, device)
    for _ in range(3):  # warm-up: allocator, AdamW's state
        trainer.step()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {k: {"steps": {False: [], True: []}, "saves": []}
                                for k in ("none", "sync", "async")}  # fmt: skip
    size = 0
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="async-save-") as tmp:
        step = 0
        for _ in range(args.rounds):
            for kind in results:
                got = segment(trainer, kind, args, env, Path(tmp), step)
                step += args.steps
                for busy in (False, True):
                    results[kind]["steps"][busy] += got["steps"][busy]
                results[kind]["saves"] += got["saves"]
        size = max(p.stat().st_size for p in Path(tmp).glob("*/checkpoints/*.pt"))
    base = _ms(results["none"]["steps"][False])
    rows = []
    for kind, r in results.items():
        for busy in (False, True):
            if r["steps"][busy]:
                ms = _ms(r["steps"][busy])
                rows.append({
                    "segment": kind,
                    "what": "step, a write in flight" if busy else "step",
                    "n": len(r["steps"][busy]),
                    "median_ms": round(ms, 1),
                    "vs_no_checkpoints": round(ms / base, 3),
                })  # fmt: skip
        if r["saves"]:
            ms = _ms(r["saves"])
            rows.append({
                "segment": kind,
                "what": "save call (training stalls)",
                "n": len(r["saves"]),
                "median_ms": round(ms, 1),
                "vs_no_checkpoints": round(ms / base, 3),
            })  # fmt: skip
    overlap = _ms(results["async"]["steps"][True]), _ms(results["async"]["steps"][False])
    print(f"{args.model} on {device}, {args.threads} intra-op thread(s), checkpoint "
          f"{size / 1e6:.0f} MB, a save every {args.save_every} steps")  # fmt: skip
    print(f"{'segment':8} {'what':30} {'n':>4} {'median ms':>10} {'x step':>7}")
    for row in rows:
        print(f"{row['segment']:8} {row['what']:30} {row['n']:>4} {row['median_ms']:>10.1f} "
              f"{row['vs_no_checkpoints']:>7.2f}")  # fmt: skip
    if None not in overlap:
        print(f"async: a step with a write in flight takes {overlap[0] / overlap[1]:.2f}x a step "
              "without one (goal: at most 1.1x)")  # fmt: skip
    with open(out_dir / "bench_async_save.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
