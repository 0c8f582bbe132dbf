"""When does a hierarchical all-reduce beat the flat one? Measured on an emulated slow link.

    python -m benchmarks.bench_topology                  # 2x2 on 4 CPU ranks, via torchrun
    python -m benchmarks.bench_topology --topology 2x3 --inter-node-gbps 1 10

The ranks pretend to sit on N nodes of G ranks (comm/topology.py). Every collective whose
group spans nodes is followed by a sleep of its bytes per rank / link speed, so the loopback
stands for the fast intra-node link and the sleep for the slow network. At each size S
(float32) and link speed B, each rank times `flat_all_reduce` (one ring over all W ranks,
which the slow links pace: 2(W-1)/W x S / B) and `hierarchical_all_reduce` (reduce-scatter in
the node, all-reduce of an S/G shard across nodes: 2(N-1)/N x S/G / B, all-gather in the
node); the time of one call is the slowest rank's mean in the fastest of a few rounds.

Beside the measurement, a prediction: each algorithm's loopback cost is fitted first, with
no emulated link, as t = alpha + beta x S (least squares in relative error over the sizes);
the emulated link then adds the bytes each rank sends over it divided by its speed B. With
x = 2(W-1)/W and z = 2(N-1)/N x 1/G:

    flat(S, B) = alpha_f + beta_f S + x S / B        (no link term when N = 1)
    hier(S, B) = alpha_h + beta_h S + z S / B

Hierarchy pays above the size where the bytes it keeps off the slow link, (x - z) S, take
longer on that link than its extra loopback cost:

    S* = (alpha_h - alpha_f) / ((x - z) / B - (beta_h - beta_f))

The loopback fit is this machine's; the link term is the ring formula. The textbook cost
model with per-step latencies (study/cost_model.py, another branch of this project) can replace
the fit later without changing the measurement.

Output on rank 0: the table on stdout, <out-dir>/bench_topology.csv.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.bench_sync import rounds_of
from comm.topology import (
    Topology,
    build_topology,
    flat_all_reduce,
    hierarchical_all_reduce,
    inter_node_bytes_per_rank,
    parse_topology,
)
from core.cli import Parser, non_negative, positive
from core.dist import DistEnv, choose_threads, distributed, rank0_logger
from core.errors import UsageError, run_cli
from study.bench import add_world_flags, launch, parse_size, rank_backend, sizes

ALGORITHMS = {"flat": flat_all_reduce, "hier": hierarchical_all_reduce}
COLUMNS = (
    "topology", "gbps", "bytes", "flat_us", "hier_us", "pred_flat_us", "pred_hier_us",
    "winner", "predicted_winner",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="2x2", help="NODESxPER_NODE; the world is N x G ranks")
    p.add_argument(
        "--inter-node-gbps",
        type=float,
        nargs="+",
        default=[1.0, 10.0, 100.0],
        help="emulated inter-node link speeds, Gbit/s (one table block each)",
    )
    p.add_argument("--min-bytes", default="4K", help="smallest size (e.g. 4096, 64K, 16M)")
    p.add_argument("--max-bytes", default="16M", help="largest size")
    p.add_argument("--step-factor", type=int, default=4, help="each size is this x the last")
    p.add_argument("--warmup", type=non_negative, default=2, help="untimed calls per size")
    p.add_argument("--iters", type=positive, default=5, help="timed calls per round")
    p.add_argument("--rounds", type=positive, default=3, help="rounds; the fastest is reported")
    p.add_argument("--out-dir", default="bench_out", help="bench_topology.csv goes here")
    add_world_flags(p)
    return p.parse_args(argv)


def fit_loopback(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(alpha, beta) of t = alpha + beta x S over (bytes, seconds), least squares in relative
    error (each row divided by its t), so that the small sizes count as much as the large."""
    a = torch.tensor([[1.0 / t, s / t] for s, t in points], dtype=torch.float64)
    ones = torch.ones(len(points), 1, dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(a, ones).solution.flatten().tolist()
    return alpha, beta


def link_factors(nodes: int, per_node: int) -> tuple[float, float]:
    """(x, z): bytes per rank on the inter-node link, as multiples of S, for the flat ring
    and the hierarchical all-reduce (comm/topology.py's formulas)."""
    per_byte = inter_node_bytes_per_rank(1, nodes, per_node)
    return per_byte["flat"], per_byte["hierarchical"]


def predict(nbytes: int, fit: tuple[float, float], slow: float, gbps: float) -> float:
    """Seconds: the loopback fit plus `slow` x nbytes over a link of `gbps` Gbit/s."""
    alpha, beta = fit
    return alpha + beta * nbytes + slow * nbytes * 8 / (gbps * 1e9)


def crossover(
    flat: tuple[float, float], hier: tuple[float, float], x: float, z: float, gbps: float
) -> float:
    """S*: the size above which the model says hierarchy wins (inf: never; 0: always)."""
    extra = hier[0] - flat[0]
    gain = (x - z) * 8 / (gbps * 1e9) - (hier[1] - flat[1])  # seconds saved per byte
    if gain <= 0:
        return 0.0 if extra < 0 else float("inf")
    return max(extra / gain, 0.0)


def _time(nbytes: int, topo: Topology, env: DistEnv, args: argparse.Namespace) -> dict:
    """Seconds per call of each algorithm: the fastest of --rounds rounds (the two interleaved)
    of --iters calls, each round timed on the slowest rank."""
    x = torch.ones(nbytes // 4, device=env.device)
    calls = {a: functools.partial(fn, x, topo) for a, fn in ALGORITHMS.items()}
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    return rounds_of(calls, args.rounds, args.iters, env)


def measure(args: argparse.Namespace, env: DistEnv) -> list[dict]:
    nodes, per_node = parse_topology(args.topology)
    topo = build_topology(args.topology)
    size_list = sizes(parse_size(args.min_bytes), parse_size(args.max_bytes), args.step_factor)
    size_list = [max(s // 4, 1) * 4 for s in size_list]  # whole float32 elements
    log = rank0_logger(env, "bench")
    log.info(
        "%s on %d %s rank(s), float32; time per call: %d warm-up calls, then the fastest of %d "
        "rounds of %d calls (slowest rank's mean)",
        args.topology,
        env.world_size,
        env.backend,
        args.warmup,
        args.rounds,
        args.iters,
    )
    # The loopback fit: both algorithms with no emulated link.
    loop = {s: _time(s, topo, env, args) for s in size_list}
    fits = {a: fit_loopback([(s, loop[s][a]) for s in size_list]) for a in ALGORITHMS}
    for a, (alpha, beta) in fits.items():
        log.info(
            "loopback fit, %s: alpha %.0f us, 1/beta %.2f GB/s",
            a,
            alpha * 1e6,
            1 / beta / 1e9 if beta > 0 else float("inf"),
        )
    x, z = link_factors(nodes, per_node)
    rows = []
    for gbps in args.inter_node_gbps:
        topo.inter_node_gbps = gbps
        s_star = crossover(fits["flat"], fits["hier"], x, z, gbps)
        log.info(
            "\ninter-node link %g Gbit/s: the model predicts hierarchy wins above %s",
            gbps,
            "no size" if s_star == float("inf") else f"{s_star / 1024:.0f} KiB",
        )
        log.info(
            "%10s %11s %11s %11s %11s  %-8s %-8s",
            *("bytes", "flat(us)", "hier(us)", "pred flat", "pred hier", "winner", "predicted"),
        )
        for s in size_list:
            measured = _time(s, topo, env, args)
            pred = {
                "flat": predict(s, fits["flat"], x, gbps),
                "hier": predict(s, fits["hier"], z, gbps),
            }
            row = {
                "topology": args.topology,
                "gbps": gbps,
                "bytes": s,
                "flat_us": measured["flat"] * 1e6,
                "hier_us": measured["hier"] * 1e6,
                "pred_flat_us": pred["flat"] * 1e6,
                "pred_hier_us": pred["hier"] * 1e6,
                "winner": min(measured, key=measured.get),
                "predicted_winner": min(pred, key=pred.get),
            }
            rows.append(row)
            log.info(
                "%10d %11.0f %11.0f %11.0f %11.0f  %-8s %-8s",
                *(row[c] for c in COLUMNS[2:]),
            )
    agree = sum(r["winner"] == r["predicted_winner"] for r in rows)
    log.info("\nthe model picked the measured winner in %d of %d cases", agree, len(rows))
    if env.is_main:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "bench_topology.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        log.info("rows in %s", out / "bench_topology.csv")
    dist.barrier()
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    nodes, per_node = parse_topology(args.topology)
    if min(args.inter_node_gbps) <= 0:
        raise UsageError("--inter-node-gbps: link speeds must be positive")
    if "RANK" not in os.environ:  # not under torchrun: start it, with this command line
        own_argv = sys.argv[1:] if argv is None else argv
        nproc = args.nproc or nodes * per_node
        raise SystemExit(launch("benchmarks.bench_topology", own_argv, args.backend, nproc))
    with distributed(rank_backend(args.backend)) as env:
        rank0_logger(env, "bench").info(choose_threads(env.local_world_size))
        return measure(args, env)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
