"""--compile against eager: compile time, step time, and how many graphs and buckets.

    python -m benchmarks.bench_compile --nproc 2                   # cnn: ddp, overlap, zero1
    python -m benchmarks.bench_compile --nproc 2 --bucket-cap-mb 0.1 --model mlp
    python -m benchmarks.bench_compile --nproc 2 --model gpt --modes ddp --compiled-autograd
    python -m benchmarks.bench_compile --model gpt --bucket-cap-mb 1 --modes ddp overlap

For each --sync mode the same model is built twice, eager and compiled (training/compiled.py's
maybe_compile, inductor unless --compile-backend), and trained on a fixed batch with SGD:

- first step: the compiled one includes dynamo's tracing and the backend's compilation
  (inductor writes and builds C++ kernels, cached in $TORCHINDUCTOR_CACHE_DIR: a second run
  is much faster);
- step time: fastest of --rounds rounds of --steps steps, slowest rank, eager and compiled
  interleaved (benchmarks/bench_sync.py's rounds_of), and the speed-up;
- graphs: dynamo's graphs (counters["stats"]["unique_graphs"]), graph breaks, and the pieces
  the backend compiled (counters["aot_autograd"]["total"]): with --sync ddp one per bucket
  of DDPOptimizer, whose own count is read from its log line;
- buckets: of the ddp row, DDPOptimizer's; of the `ddp+ca` row (--compiled-autograd: DDP's
  Python reducer traced by compiled autograd, training/compiled.py), those inductor's fusion
  pass made of the backward graph's per-parameter all-reduces (counters["inductor"]
  ["ddp_buckets"]; none with another backend, which leaves one all-reduce per parameter:
  the all-reduce column counts them in the graphs compiled autograd handed to the backend).

Timings on a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks.bench_sync import rounds_of
from benchmarks.workload import Workload, add_model_flags, workload
from core.cli import Parser, positive, positive_float
from core.dist import DistEnv, distributed, rank0_logger
from core.errors import run_cli
from parallel.ddp import choose_reducer
from parallel.factory import HSDP_MODES, SYNC_MODES, make_sync
from study.bench import add_world_flags, launch_unless_ranked, rank_backend
from training.compiled import compiled_autograd, maybe_compile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    add_model_flags(p)
    p.add_argument(
        "--modes", nargs="+", default=["ddp", "overlap", "zero1"],
        choices=[m for m in SYNC_MODES if m not in HSDP_MODES],
        help="--sync modes to compare (not hsdp's: they shard by a --topology, which this "
        "benchmark does not take)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=positive, default=32, help="samples per rank per step")
    p.add_argument("--steps", type=positive, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=positive, default=3, help="rounds; the fastest is reported")
    p.add_argument(
        "--bucket-cap-mb", type=positive_float, default=None,
        help="DDP's and overlap's bucket cap (unset: 25); DDPOptimizer's first bucket is 1 MiB "
        "whatever this says, and DDPOptimizer refuses a cap below it",
    )  # fmt: skip
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument(
        "--compiled-autograd", action="store_true",
        help="with ddp among --modes: a ddp+ca row, DDP's Python reducer under compiled autograd",
    )  # fmt: skip
    add_world_flags(p)
    return p.parse_args(argv)


class Lines(logging.Handler):
    """DDPOptimizer's 'created N buckets' line, kept."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def rows_of(args: argparse.Namespace) -> list[str]:
    """The --modes, with ddp+ca after ddp under --compiled-autograd."""
    ca = ["ddp+ca"] if args.compiled_autograd and "ddp" in args.modes else []
    return [r for mode in args.modes for r in ([mode, *ca] if mode == "ddp" else [mode])]


def measure(args: argparse.Namespace, env: DistEnv, work: Workload) -> list[dict]:
    lines = Lines()
    logger = logging.getLogger("torch._dynamo.backends.distributed")
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    rows = []
    all_reduces: list[int] = []

    def recording(gm: torch.fx.GraphModule, inputs):  # compiled autograd's graphs
        all_reduces.append(sum("all_reduce" in str(n.target) for n in gm.graph.nodes))
        return torch._dynamo.lookup_backend(args.compile_backend)(gm, inputs)

    for row in rows_of(args):
        mode, ca = row.removesuffix("+ca"), row.endswith("+ca")
        cap = None if args.bucket_cap_mb is None else int(args.bucket_cap_mb * 2**20)
        steps, first, stats = {}, {}, {}
        for variant in ("eager", "compiled"):
            torch._dynamo.reset()
            counters.clear()
            lines.lines.clear()
            all_reduces.clear()
            torch.manual_seed(0)
            model = work.build().to(env.device)
            buckets = cap if mode in ("ddp", "allreduce", "overlap") else None
            flags = argparse.Namespace(
                compile=variant == "compiled", compiled_autograd=ca and variant == "compiled"
            )
            choose_reducer(flags.compiled_autograd)  # as ddp_kwargs(args) before DDP(...)
            sync = make_sync(mode, model, env, bucket_bytes=buckets)
            choose_reducer(False)
            opt = sync.make_optimizer(torch.optim.SGD, dict(lr=1e-3, momentum=0.9))
            maybe_compile(sync.model, flags, backend=args.compile_backend)

            def step(sync=sync, opt=opt, flags=flags) -> None:
                with compiled_autograd(flags, backend=recording):  # TrainLoop's block
                    work.loss(sync.model).backward()
                sync.finish_backward()
                opt.step()
                sync.after_step(opt)
                opt.zero_grad(set_to_none=True)

            tic = time.perf_counter()
            step()
            first[variant] = time.perf_counter() - tic
            step()  # DDP rebuilds its buckets after the first step
            ddp_optimizer = next((s.strip() for s in lines.lines if "buckets" in s), "")
            stats[variant] = dict(
                graphs=counters["stats"]["unique_graphs"],
                breaks=sum(counters["graph_break"].values()),
                pieces=counters["aot_autograd"]["total"],
                ddp_optimizer=ddp_optimizer,
                buckets=counters["inductor"]["ddp_buckets"] if ca else bucket_count(ddp_optimizer),
                all_reduces=max(all_reduces, default=0),
            )
            steps[variant] = step
        times = rounds_of(steps, args.rounds, args.steps, env)
        rows.append(
            dict(mode=row, first=first, times=times, **stats["compiled"])
        )  # fmt: skip
    return rows


def bucket_count(line: str) -> int:
    """N of DDPOptimizer's '... created N buckets.' (0: no such line)."""
    words = line.split()
    return int(words[words.index("created") + 1]) if "created" in words else 0


def report(args: argparse.Namespace, env: DistEnv, work: Workload, rows: list[dict]) -> None:
    if not env.is_main:
        return
    log = rank0_logger(env, "bench")
    params = sum(p.numel() for p in work.build().parameters())
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    log.info(
        "%d ranks, %s, torch %s, %s (%d parameters, %.0f KB float32), backend %s; load "
        "average %s on %d cores",
        env.world_size, env.backend, torch.__version__, work.what, params, params * 4 / 1024,
        args.compile_backend, load, os.cpu_count(),
    )  # fmt: skip
    log.info(
        "  %-10s %12s %14s %11s %13s %8s %7s %7s %7s %8s %12s",
        "mode", "eager 1st s", "compiled 1st s", "eager ms", "compiled ms", "speedup",
        "graphs", "breaks", "pieces", "buckets", "all-reduces",
    )  # fmt: skip
    for r in rows:
        log.info(
            "  %-10s %12.2f %14.2f %11.2f %13.2f %7.2fx %7d %7d %7d %8d %12d",
            r["mode"], r["first"]["eager"], r["first"]["compiled"], r["times"]["eager"] * 1e3,
            r["times"]["compiled"] * 1e3, r["times"]["eager"] / r["times"]["compiled"],
            r["graphs"], r["breaks"], r["pieces"], r["buckets"], r["all_reduces"],
        )  # fmt: skip
        if r["ddp_optimizer"]:
            log.info("    %s: %s", r["mode"], r["ddp_optimizer"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    launch_unless_ranked("benchmarks.bench_compile", argv, args)
    with distributed(rank_backend(args.backend)) as env:
        work = workload(args, args.batch_size, env.rank, env.world_size, env.device)
        report(args, env, work, measure(args, env, work))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
