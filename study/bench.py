"""Collective benchmark in the manner of nccl-tests: time, algorithm and bus bandwidth.

    python -m study.bench                       # starts its ranks itself, see below
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m study.bench
    torchrun --standalone --nproc-per-node gpu -m study.bench --max-bytes 1G   # NCCL

Started without torchrun, it starts torchrun itself on a world that fits the machine
(`fitting_world`): one NCCL rank per GPU where there are two GPUs or more, else 2 gloo ranks
on CPU (a collective needs two ranks, and NCCL cannot put two ranks on one GPU); --backend and
--nproc override that. Under torchrun the default backend is nccl where every local rank has
a GPU of its own, else gloo.

For each size S (bytes, float32) and op, every rank runs `--warmup` untimed and `--iters`
timed calls; the time of one call is the slowest rank's mean. Then

    algbw = S / time                   what the caller sees
    busbw = algbw x factor             what each link carries on a bandwidth-optimal ring:
        all_reduce 2(N-1)/N, all_gather / reduce_scatter / all_to_all (N-1)/N, broadcast 1

so busbw is comparable across ops and world sizes and approaches the link speed. S is the
all-reduce/broadcast tensor, the all-gather output, the reduce-scatter and all-to-all input.
`ring_all_reduce` (comm/ring.py) runs in the same sweep, right after the library's
all_reduce at each size, so the two are measured under the same conditions. `--ops` adds the
other hand-made all-reduces: naive_all_reduce, tree_all_reduce and rhd_all_reduce
(comm/algorithms.py); `python -m study.cost_model fit` fits the CSV.

Output on rank 0: an aligned table on stdout, <out-dir>/bench.csv (one row per op and size)
and <out-dir>/bench.png (busbw against size, one line per op).

Bounded: sizes up to 4G, at most MAX_RANKS ranks, and on CPU no more than the node's available
memory can hold (`check_memory`: each rank holds about three buffers of the largest size
besides torch itself); every rank ends when torchrun does, and torchrun when its launcher does
(core/processes.py's die_with_parent), so a killed launcher leaves no rank behind.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from comm.algorithms import rhd_all_reduce, tree_all_reduce
from comm.compat import all_gather_single, reduce_scatter_single
from comm.ring import bus_factor, naive_all_reduce, ring_all_reduce
from comm.shm import shm_all_reduce
from core.cli import Parser, bounded_int
from core.dist import BACKENDS, DistEnv, choose_threads, distributed, rank0_logger
from core.errors import UsageError, run_cli
from core.files import writing
from core.processes import available_memory, die_with_parent

OPS = (
    "all_reduce",
    "ring_all_reduce",
    "naive_all_reduce",
    "tree_all_reduce",
    "rhd_all_reduce",
    "shm_all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_to_all",
)
# The other hand-made all-reduces (comm/algorithms.py; comm/shm.py's, one node and CPU only) on
# request: `make model` sweeps the first three, benchmarks/bench_shm.py the last.
DEFAULT_OPS = tuple(
    op
    for op in OPS
    if op not in ("naive_all_reduce", "tree_all_reduce", "rhd_all_reduce", "shm_all_reduce")
)
COLUMNS = ("op", "bytes", "count", "world_size", "backend", "time_us", "algbw_gbs", "busbw_gbs")
MAX_BYTES = 1 << 32  # 4G: the largest message size
MAX_RANKS = 256  # ranks a launcher may start on one node
MAX_CALLS = 100_000  # --warmup and --iters, per size
RANK_OVERHEAD = 400 << 20  # what a CPU rank holds before its buffers (torch, gloo): ~400 MB


def fitting_world(backend: str | None, nproc: int | None, gpus: int) -> tuple[str, int]:
    """(backend, ranks) for a benchmark on a machine with `gpus` visible GPUs: one nccl rank
    per GPU with two GPUs or more, else 2 gloo ranks on CPU. An explicit `backend` or `nproc`
    wins; given only `nproc`, the backend is nccl where each rank gets a GPU of its own."""
    if backend is None:
        backend = "nccl" if (gpus >= nproc if nproc else gpus >= 2) else "gloo"
    if nproc is None:
        nproc = max(gpus, 1) if backend == "nccl" else 2
    return backend, nproc


def rank_backend(backend: str | None) -> str:
    """The backend of a rank started by torchrun: `backend`, else what fits its node's ranks."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return backend or fitting_world(None, local_ranks, torch.cuda.device_count())[0]


def launch(module: str, argv: Sequence[str], backend: str | None, nproc: int | None) -> int:
    """Start `python -m module argv` on a fitting world through torchrun, one intra-op thread
    per rank unless OMP_NUM_THREADS says otherwise; return torchrun's exit status."""
    gpus = torch.cuda.device_count()  # this process only starts the ranks: no CUDA use here
    chosen, nproc = fitting_world(backend, nproc, gpus)
    where = f"{nproc} {chosen} rank(s)" + (" on CPU" if chosen == "gloo" else "")
    print(f"{module}: {gpus} GPU(s) visible, starting {where} (--backend/--nproc to choose)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", module, *rank_argv(argv), "--backend", chosen]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.stdout.flush()
    # torchrun ends (and ends its ranks) when this launcher does, however it ends.
    return subprocess.call(cmd, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))


def launch_unless_ranked(module: str, argv: Sequence[str] | None, args: argparse.Namespace) -> None:
    """Under torchrun (RANK set): return, this process is a rank. Otherwise start torchrun
    on `module` with this same command line (`argv`, or sys.argv when None) and the world of
    `args.backend`/`args.nproc`, and exit with its status."""
    if "RANK" not in os.environ:
        own_argv = sys.argv[1:] if argv is None else argv
        raise SystemExit(launch(module, own_argv, args.backend, args.nproc))
    die_with_parent()  # a rank outlives no torchrun: nothing is left to report to


def rank_argv(argv: Sequence[str]) -> list[str]:
    """`argv` without the world flags, which `launch` has used up: the ranks learn their world
    from torchrun and get --backend appended. --nproc must go anyway: torchrun reads every
    argument, also those after the module, and refuses it as an abbreviation of its own
    --nproc-per-node/--nproc_per_node ("ambiguous option")."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc", "--backend"):
            skip = True  # and its value, the next argument
        elif not arg.startswith(("--nproc=", "--backend=")):
            out.append(arg)
    return out


def add_world_flags(p: argparse.ArgumentParser) -> None:
    """--backend and --nproc, the flags of `launch` and `rank_backend`."""
    p.add_argument(
        "--backend", choices=BACKENDS, help="default: nccl if each rank has a GPU, else gloo"
    )
    p.add_argument(
        "--nproc",
        type=bounded_int(1, MAX_RANKS, "--nproc"),
        default=None,
        help="ranks to start when not run under torchrun (default: one per GPU with 2+ GPUs, "
        "else 2 on CPU)",
    )


def parse_size(text: str) -> int:
    """'4096', '64K', '16M', '1G' (powers of 1024) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(number) * scale
    except ValueError:
        raise UsageError(f"not a size: {text!r} (use e.g. 4096, 64K, 16M)") from None
    if value < 4:
        raise UsageError(f"size {text!r} is smaller than one float32")
    if value > MAX_BYTES:
        raise UsageError(f"size {text!r} is larger than {human(MAX_BYTES)}, the most timed here")
    return value


def check_memory(ranks: int, max_bytes: int) -> None:
    """Refuse a CPU world whose buffers the node cannot hold: an out-of-memory kill would end
    torchrun without a line and leave ranks behind."""
    need = ranks * (RANK_OVERHEAD + 3 * max_bytes)
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"{ranks} CPU rank(s) timing up to {human(max_bytes)} need about "
            f"{need / 1e9:.1f} GB of memory, this node has {free / 1e9:.1f} GB available: "
            "lower --max-bytes or --nproc"
        )


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """min, min x factor, ... up to max (nccl-tests' -b/-e/-f)."""
    if min_bytes > max_bytes:
        raise UsageError(f"--min-bytes {min_bytes} is larger than --max-bytes {max_bytes}")
    if factor < 2:
        raise UsageError("--step-factor must be 2 or more")
    out = [min_bytes]
    while out[-1] * factor <= max_bytes:
        out.append(out[-1] * factor)
    return out


def make_op(op: str, nbytes: int, env: DistEnv) -> tuple[Callable[[], object], int]:
    """A zero-argument call of `op` on buffers of about `nbytes`, and the exact size S used
    (rounded down to whole float32 elements that divide among the ranks)."""
    w = env.world_size
    count = max(nbytes // 4 // w, 1) * w
    x = torch.ones(count, device=env.device)
    out = torch.empty_like(x)
    part = torch.empty(count // w, device=env.device)
    calls = {
        "all_reduce": lambda: dist.all_reduce(x),
        "ring_all_reduce": lambda: ring_all_reduce(x),
        "naive_all_reduce": lambda: naive_all_reduce(x),
        "tree_all_reduce": lambda: tree_all_reduce(x),
        "rhd_all_reduce": lambda: rhd_all_reduce(x),
        "shm_all_reduce": lambda: shm_all_reduce(x),
        "all_gather": lambda: all_gather_single(x, part),
        "reduce_scatter": lambda: reduce_scatter_single(part, x),
        "broadcast": lambda: dist.broadcast(x, src=0),
        "all_to_all": lambda: dist.all_to_all_single(out, x),
    }
    return calls[op], count * 4


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def time_op(call: Callable[[], object], env: DistEnv, warmup: int, iters: int) -> float:
    """Seconds per call: each rank's mean over `iters`, then the slowest rank's."""
    for _ in range(warmup):
        call()
    _sync(env)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    _sync(env)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], device=env.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def bandwidths(op: str, nbytes: int, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes per second, as nccl-tests)."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, world_size)


def run(
    env: DistEnv,
    ops: list[str],
    size_list: list[int],
    warmup: int,
    iters: int,
    out_dir: Path | None,
) -> list[dict]:
    """Benchmark every (size, op); rank 0 prints the table and writes CSV and plot."""
    log = rank0_logger(env, "bench")
    log.info(
        "%d ranks, backend %s, float32, %d warm-up + %d timed iterations, time = slowest rank",
        env.world_size,
        env.backend,
        warmup,
        iters,
    )
    header = f"{'op':>16} {'size':>10} {'count':>10} {'time(us)':>11} {'algbw':>8} {'busbw':>8}"
    units = f"{'':>16} {'':>10} {'':>10} {'':>11} {'(GB/s)':>8} {'(GB/s)':>8}"
    log.info("%s\n%s", header, units)
    rows = []
    for nbytes in size_list:
        for op in ops:
            call, exact = make_op(op, nbytes, env)
            seconds = time_op(call, env, warmup, iters)
            algbw, busbw = bandwidths(op, exact, seconds, env.world_size)
            row = {
                "op": op,
                "bytes": exact,
                "count": exact // 4,
                "world_size": env.world_size,
                "backend": env.backend,
                "time_us": seconds * 1e6,
                "algbw_gbs": algbw,
                "busbw_gbs": busbw,
            }
            rows.append(row)
            log.info(
                "%16s %10s %10d %11.1f %8.3f %8.3f",
                op,
                human(exact),
                exact // 4,
                row["time_us"],
                algbw,
                busbw,
            )
    if env.is_main and out_dir is not None:
        write_csv(rows, out_dir / "bench.csv")
        # The load the times were measured at: on a shared machine they change with it.
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        plot(rows, out_dir / "bench.png", f"{env.world_size} ranks, {env.backend}, {load}")
        log.info("wrote %s and %s", out_dir / "bench.csv", out_dir / "bench.png")
    return rows


def human(nbytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return str(nbytes)


def write_csv(rows: list[dict], path: Path) -> None:
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


HIGHLIGHT = ("all_reduce", "ring_all_reduce")  # the comparison the README draws


def plot(rows: list[dict], path: Path, title: str):
    """Two log-log panels against the message size, ticked in the table's units (1K ... 64M):
    the time per call, where the fixed latency of small messages shows as a floor, and the
    bus bandwidth. gloo's all_reduce and the hand-made ring are drawn bold, the rest faint."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = sorted({r["bytes"] for r in rows})
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        style = (
            {"linewidth": 2.5, "alpha": 1.0, "zorder": 3}
            if op in HIGHLIGHT
            else {"linewidth": 1.0, "alpha": 0.45, "zorder": 2}
        )
        x = [r["bytes"] for r in mine]
        left.plot(x, [r["time_us"] for r in mine], marker="o", markersize=3, label=op, **style)
        right.plot(x, [r["busbw_gbs"] for r in mine], marker="o", markersize=3, label=op, **style)
    for ax, ylabel in ((left, "time per call (us)"), (right, "bus bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sizes, [human(n) for n in sizes])
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    left.set_title("time: a latency floor, then proportional to size")
    right.set_title("bus bandwidth")
    right.legend(fontsize=8)
    fig.suptitle(f"collectives, {title}; bold: gloo all_reduce vs the hand-made ring")
    fig.tight_layout()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, metadata={"Title": fig.get_suptitle()})  # readable too
    plt.close(fig)
    return fig  # closed, but its axes can still be inspected (the tests do)


def main(argv: list[str] | None = None) -> list[dict]:
    p = Parser(description=__doc__)
    p.add_argument(
        "--ops",
        nargs="+",
        default=list(DEFAULT_OPS),
        choices=OPS,
        help="collectives to time, in this order at each size",
    )
    p.add_argument("--min-bytes", default="1K", help="smallest size (e.g. 4096, 64K, 16M)")
    p.add_argument("--max-bytes", default="64M", help="largest size")
    p.add_argument(
        "--step-factor",
        type=bounded_int(2, MAX_BYTES, "--step-factor"),
        default=4,
        help="each size is this x the last",
    )
    p.add_argument(
        "--warmup",
        type=bounded_int(0, MAX_CALLS, "--warmup"),
        default=3,
        help="untimed calls per size",
    )
    p.add_argument(
        "--iters",
        type=bounded_int(1, MAX_CALLS, "--iters"),
        default=10,
        help="timed calls per size",
    )
    p.add_argument("--out-dir", default="bench_out", help="bench.csv and bench.png go here")
    add_world_flags(p)
    args = p.parse_args(argv)
    size_list = sizes(parse_size(args.min_bytes), parse_size(args.max_bytes), args.step_factor)
    if "RANK" not in os.environ:
        backend, nproc = fitting_world(args.backend, args.nproc, torch.cuda.device_count())
    else:
        backend, nproc = rank_backend(args.backend), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "gloo":
        check_memory(nproc, size_list[-1])
    with writing(Path(args.out_dir)):  # refused now, not after the whole sweep
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    launch_unless_ranked("study.bench", argv, args)
    with distributed(rank_backend(args.backend)) as env:
        threads = choose_threads(env.local_world_size, device=env.device.type)
        rank0_logger(env, "bench").info(threads)
        return run(env, args.ops, size_list, args.warmup, args.iters, Path(args.out_dir))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
