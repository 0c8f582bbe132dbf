"""A W-rank job played by one process: per-rank memory and bytes sent of each sharding mode at
any world size, counted from the real code next to the formulas.

    python -m study.simulate --world 1024 --sync zero3 --model resnet18
    python -m study.simulate --world 64 --sync fsdp2 --model cnn --json
    python -m study.simulate --world 1024 --sync hsdp --topology 128x8   # nodes x ranks each

The process joins torch's fake process group (backend "fake": every collective returns at
once and moves nothing, the trick torchtitan uses to check a 128-GPU configuration on one
machine) as one rank of a world of --world ranks, builds the model and the `--sync` mode
exactly as train_ddp.py does, and trains two steps with AdamW on random data. Then it
reports, for that rank:

- params, grads, optimizer: bytes of the distinct storages behind the model's parameters,
  their gradients and AdamW's two state tensors, after the second optimizer step
  (parallel/memory.py's `rank_memory`: counted, not computed);
- bytes_sent_per_rank: what this rank sends in the second step, from comm/tracer.py (the
  ring model: (n-1)/n of each all-gather and reduce-scatter payload, 2(n-1)/n of each
  all-reduce, n the ranks of the collective's group), and split by process group (hsdp,
  --topology NxG: inside a node, across nodes, over the world);
- beside each, the formula (parallel/memory.py's `expected_bytes`), and the communication
  time the alpha-beta model predicts for the traced collectives on a datacentre link
  (--alpha-us, --gbps; each collective as a ring over its group of n ranks: (n-1) or
  2(n-1) latencies).

The numbers (values) the fake collectives leave in the tensors are meaningless; sizes,
storages and collective calls are the real code's. Rank 0 is the default because the
padding of the flat shards goes to the last rank: rank 0 holds the most.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.testing._internal.distributed.fake_pg import FakeStore

from comm.topology import INTER, INTRA, check_topology_flags, parse_topology
from comm.tracer import CommTracer
from core.cli import Parser, bounded_int, non_negative_float, positive, positive_float
from core.dist import DistEnv, rank0_logger
from core.errors import UsageError, run_cli
from parallel.factory import make_sync
from parallel.flags import HSDP_MODES
from parallel.memory import KINDS, SIMULATED_MODES, expected_bytes, rank_memory
from training.models import MODELS, build_model

MAX_WORLD = 1 << 16
KIND_STEPS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--world", type=bounded_int(2, MAX_WORLD, "--world"), required=True,
                   help="ranks in the simulated job")  # fmt: skip
    p.add_argument("--sync", choices=SIMULATED_MODES, required=True, help="the mode to play")
    p.add_argument("--topology", default=None, metavar="NODESxPER_NODE",
                   help="--sync hsdp and torch-hsdp (required there): the nodes they shard "
                   "inside, as train_ddp.py's --topology")  # fmt: skip
    p.add_argument("--model", choices=MODELS, default="cnn", help="network (3x32x32 inputs)")
    p.add_argument("--rank", type=int, default=0, help="which rank this process plays")
    p.add_argument("--batch-size", type=positive, default=4, help="samples per rank")
    p.add_argument("--alpha-us", type=non_negative_float, default=5.0,
                   help="latency per message, microseconds (cost model)")  # fmt: skip
    p.add_argument("--gbps", type=positive_float, default=25.0,
                   help="link bandwidth, GB/s (cost model)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if not 0 <= args.rank < args.world:
        raise UsageError(f"--rank {args.rank} is not a rank of a world of {args.world}")
    if args.topology is not None and args.sync not in HSDP_MODES:
        raise UsageError(f"--topology applies to --sync {' and '.join(HSDP_MODES)} here")
    check_topology_flags(args.topology, None, args.sync, args.world)
    return args


def fake_ddp_hook(state, bucket):
    """DDP's default hook (average the bucket) through dist.all_reduce, whose fake future holds
    no tensor: the bucket's own buffer stands for the result."""
    buffer = bucket.buffer()
    dist.all_reduce(buffer.div_(dist.get_world_size()))
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def simulate(args: argparse.Namespace) -> dict:
    """Join the fake group as `args.rank` of `args.world`, run two steps, count."""
    if dist.is_initialized():
        raise UsageError("study.simulate makes its own (fake) process group: run it alone")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("fake", store=FakeStore(), rank=args.rank, world_size=args.world)
    try:
        env = DistEnv(args.rank, 0, args.world, 1, "fake", torch.device("cpu"))
        torch.manual_seed(0)
        model = build_model(args.model, 3, 32, 10)
        layout = {"topology": args.topology} if args.topology else {}
        per_node = parse_topology(args.topology)[1] if args.topology else None
        expected = expected_bytes(args.sync, model, args.world, 4, per_node)
        if args.sync == "ddp":
            model = DDP(model)
            model.register_comm_hook(None, fake_ddp_hook)
        sync = make_sync(args.sync, model, env, **layout)
        optimizer = sync.make_optimizer(torch.optim.AdamW, {"lr": 1e-3})
        tracer = CommTracer(enabled=True)
        tracer.attach(sync.model)
        x = torch.randn(args.batch_size, 3, 32, 32)
        y = torch.randint(10, (args.batch_size,))
        held: dict[str, int] = {}
        with tracer:
            for _ in range(2):  # the first step creates AdamW's state; the second is steady
                first = len(tracer.events)
                F.cross_entropy(sync.model(x), y).backward()
                sync.finish_backward()
                optimizer.step()
                held = rank_memory(sync.model, optimizer)
                sync.after_step(optimizer)
                optimizer.zero_grad(set_to_none=True)
        events = tracer.events[first:]
    finally:
        dist.destroy_process_group()
    sent = sum(e.sent for e in events)
    alpha, beta = args.alpha_us * 1e-6, 1 / (args.gbps * 1e9)
    # A ring over a group of n ranks takes (n-1) or 2(n-1) latencies: hsdp's groups are a
    # node (intra-node, FSDP2's mesh_shard) or one rank per node (inter-node, mesh_replicate).
    nodes, per_node = parse_topology(args.topology) if args.topology else (1, args.world)
    ranks = {INTRA: per_node, "mesh_shard": per_node, INTER: nodes, "mesh_replicate": nodes}
    seconds = sum(
        KIND_STEPS.get(e.kind, 1) * (ranks.get(e.group, args.world) - 1) * alpha + e.sent * beta
        for e in events
    )
    return {
        "world": args.world,
        "rank": args.rank,
        "sync": args.sync,
        "topology": args.topology,
        "model": args.model,
        "params": sum(p.numel() for p in build_model(args.model, 3, 32, 10).parameters()),
        **{f"{k}_bytes": held[k] for k in KINDS},
        **{f"formula_{k}_bytes": expected[k] for k in KINDS},
        "bytes_sent_per_rank": sent,
        # Per process group (comm/tracer.py's labels): with hsdp, what stays inside a node
        # (intra-node) and what crosses the network (inter-node); "world" spans both.
        "bytes_sent_per_group": CommTracer.sent_by_group(events),
        "formula_bytes_sent_per_rank": expected["sent"],
        "collectives_per_step": len(events),
        "predicted_comm_s": seconds,
        "link": {"alpha_us": args.alpha_us, "gbps": args.gbps},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = simulate(args)
    if args.json:
        print(json.dumps(out))
        return
    log = rank0_logger(DistEnv(0, 0, 1, 1, "fake", torch.device("cpu")), "simulate")
    log.info(
        "--sync %s, --model %s (%d parameters), rank %d of %d (fake process group)",
        out["sync"], out["model"], out["params"], out["rank"], out["world"],
    )  # fmt: skip
    log.info("%-22s %14s %14s", "bytes per rank", "counted", "formula")
    for k in KINDS:
        log.info("%-22s %14d %14d", k, out[f"{k}_bytes"], out[f"formula_{k}_bytes"])
    log.info(
        "%-22s %14.0f %14.0f", "sent per step", out["bytes_sent_per_rank"],
        out["formula_bytes_sent_per_rank"],
    )  # fmt: skip
    if len(out["bytes_sent_per_group"]) > 1:
        for group, sent in sorted(out["bytes_sent_per_group"].items()):
            log.info("%-22s %14.0f", f"  on {group}", sent)
    log.info(
        "%d collectives per step; predicted communication %.3f ms at %.1f us and %.0f GB/s "
        "per link (ring)",
        out["collectives_per_step"], out["predicted_comm_s"] * 1e3, args.alpha_us, args.gbps,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
