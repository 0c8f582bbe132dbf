"""A tour of the torch.distributed collectives: every rank's tensor before and after each one.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m study.collectives
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m study.collectives --only \
      all_to_all
    torchrun --standalone --nproc-per-node gpu -m study.collectives   # NCCL, CUDA tensors

Each demo starts from tensors whose values name their owner (rank r holds r+1, or 10r + i),
so the closed-form result is easy to read off; every rank sends its before/after strings to
rank 0, which prints them in rank order, like a diagram. Each demo also returns this rank's
result, which the tests compare with the closed form at several world sizes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import torch
import torch.distributed as dist

from comm.compat import all_gather_single, reduce_scatter_single
from core.cli import Parser
from core.dist import BACKENDS, DistEnv, choose_threads, distributed, rank0_logger
from core.errors import run_cli

UNDEFINED = "(undefined)"  # a buffer the collective leaves with no meaningful value
Shown = torch.Tensor | list | str | None
LEGEND = (
    "each line: rank r  its tensor before  ->  after.  (none): the rank passes or receives "
    "nothing there; (undefined): the buffer is scratch afterwards; 10r + i: element i of rank r"
)


def fmt(value: Shown) -> str:
    """A tensor as a short list of numbers (`[3, 3]`), a list of tensors as a list of those;
    None (no tensor at all on this rank) as `(none)`."""
    if value is None:
        return "(none)"
    if value is UNDEFINED:
        return UNDEFINED
    if isinstance(value, torch.Tensor):
        return "[" + ", ".join(f"{v:g}" for v in value.flatten().tolist()) + "]"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return repr(value)


def show(log: logging.Logger, title: str, before: Shown, after: Shown, note: str = "") -> None:
    """Print every rank's `before -> after` on rank 0, in rank order (a collective: every rank
    calls it)."""
    rows: list = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (fmt(before), fmt(after)))
    log.info("\n== %s", title)
    if note:
        log.info("   %s", note)
    width = max(len(b) for b, _ in rows)
    for r, (b, a) in enumerate(rows):
        log.info("   rank %d  %s  ->  %s", r, b.ljust(width), a)


def supports(what: str, attempt: Callable[[], object], missing: set[str]) -> bool:
    """Run `attempt` unless the backend lacks `what`. Backends refuse an unsupported op on
    every rank before any byte moves, so catching the error leaves the group usable.
    `missing` lets the tests take the fallback path on a torch whose backend has the op."""
    if what in missing:
        return False
    try:
        attempt()
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def _mine(env: DistEnv, n: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rank r's starting tensor: n copies of r+1."""
    return torch.full((n,), float(env.rank + 1), dtype=dtype, device=env.device)


def _named(env: DistEnv, n: int) -> torch.Tensor:
    """Rank r's tensor 10r + i, i < n: each element says whose it is and where it sat."""
    return torch.arange(n, dtype=torch.float32, device=env.device) + 10 * env.rank


def demo_broadcast(env: DistEnv, log: logging.Logger, missing: set[str]) -> list:
    t = _mine(env)
    before = t.clone()
    dist.broadcast(t, src=0)
    show(log, "broadcast(src=0): rank 0's tensor is copied to every rank", before, t)
    return t.tolist()


def demo_reduce(env: DistEnv, log: logging.Logger, missing: set[str]) -> list | None:
    t = _mine(env)
    before = t.clone()
    dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
    mine = t.tolist() if env.rank == 0 else None
    show(
        log,
        "reduce(dst=0, SUM): the sum of all ranks' tensors lands on rank 0 only",
        before,
        t if env.rank == 0 else UNDEFINED,
        "the other ranks' buffers are scratch space afterwards: the API promises nothing "
        "about them",
    )
    return mine


def demo_all_reduce(env: DistEnv, log: logging.Logger, missing: set[str]) -> dict:
    results = {}
    for name in ("SUM", "MAX"):
        t = _mine(env)
        before = t.clone()
        dist.all_reduce(t, op=getattr(dist.ReduceOp, name))
        show(log, f"all_reduce({name}): every rank ends with the {name} over all ranks", before, t)
        results[name] = t.tolist()

    t = _mine(env)
    before = t.clone()
    if supports("AVG", lambda: dist.all_reduce(t, op=dist.ReduceOp.AVG), missing):
        note = f"backend {env.backend} has ReduceOp.AVG"
    else:
        # gloo before torch 2.14 refuses AVG; the portable spelling is SUM, then divide.
        t = _mine(env)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
        note = f"backend {env.backend} has no ReduceOp.AVG: shown as SUM / world size"
    show(log, "all_reduce(AVG): every rank ends with the mean over all ranks", before, t, note)
    results["AVG"] = t.tolist()
    return results


def demo_gather(env: DistEnv, log: logging.Logger, missing: set[str]) -> list | None:
    t = _mine(env, 1)
    inbox = [torch.empty_like(t) for _ in range(env.world_size)] if env.rank == 0 else None
    dist.gather(t, inbox, dst=0)
    show(log, "gather(dst=0): rank 0 receives a list with every rank's tensor", t, inbox)
    return [x.item() for x in inbox] if inbox is not None else None


def demo_scatter(env: DistEnv, log: logging.Logger, missing: set[str]) -> list:
    w = env.world_size
    pieces = list(_named(env, 2 * w).view(w, 2).unbind()) if env.rank == 0 else None
    t = torch.zeros(2, device=env.device)
    dist.scatter(t, pieces, src=0)
    show(log, "scatter(src=0): rank 0's list is dealt out, element i to rank i", pieces, t)
    return t.tolist()


def demo_all_gather(env: DistEnv, log: logging.Logger, missing: set[str]) -> dict:
    t = _named(env, 2)
    as_list = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(as_list, t)
    show(log, "all_gather: every rank receives the list of all ranks' tensors", t, as_list)
    flat = torch.empty(2 * env.world_size, device=env.device)
    all_gather_single(flat, t)
    show(log, "all_gather_single: the same, into one tensor (rank order)", t, flat)
    return {"list": [x.tolist() for x in as_list], "single": flat.tolist()}


def demo_reduce_scatter(env: DistEnv, log: logging.Logger, missing: set[str]) -> list:
    w = env.world_size
    t = _named(env, w)  # element i of every rank is summed and the sum goes to rank i
    out = torch.empty(1, device=env.device)
    if supports("reduce_scatter", lambda: reduce_scatter_single(out, t), missing):
        note = "element i of the sum goes to rank i; all_reduce = reduce_scatter + all_gather"
    else:
        # Some gloo builds lack reduce_scatter: an all_reduce holds the same sum everywhere,
        # and each rank keeps its own slice of it (W times the traffic).
        total = t.clone()
        dist.all_reduce(total)
        out = total[env.rank : env.rank + 1].clone()
        note = f"backend {env.backend} has no reduce_scatter: shown as all_reduce + own slice"
    show(log, "reduce_scatter_single(SUM): rank i gets element i of the sum", t, out, note)
    return out.tolist()


def demo_all_to_all(env: DistEnv, log: logging.Logger, missing: set[str]) -> list:
    w = env.world_size
    t = _named(env, w)  # element j goes to rank j
    out = torch.empty_like(t)
    if supports("all_to_all", lambda: dist.all_to_all_single(out, t), missing):
        note = "rank d receives element d of every rank, in rank order: a transpose across ranks"
    else:
        # all_to_all is all_gather plus keeping column i of the gathered matrix.
        rows = torch.empty(w * w, device=env.device)
        all_gather_single(rows, t)
        out = rows.view(w, w)[:, env.rank].contiguous()
        note = f"backend {env.backend} has no all_to_all: shown as all_gather + own column"
    title = "all_to_all_single: element d of rank s goes to position s on rank d"
    show(log, title, t, out, note)
    return out.tolist()


def demo_barrier(env: DistEnv, log: logging.Logger, missing: set[str]) -> float:
    delay = 0.05
    dist.barrier()  # line everyone up first
    start = time.perf_counter()
    time.sleep(delay * env.rank)  # rank r arrives r x 50 ms late
    dist.barrier()
    waited = time.perf_counter() - start
    show(
        log,
        f"barrier: nobody leaves before the last rank arrives (rank r sleeps {delay * 1000:g} "
        "ms x r first)",
        torch.tensor([delay * env.rank]),
        torch.tensor([round(waited, 2)]),
        "seconds: sleep before -> time until the barrier released this rank",
    )
    return waited


def demo_send_recv(env: DistEnv, log: logging.Logger, missing: set[str]) -> dict:
    w = env.world_size
    right, left = (env.rank + 1) % w, (env.rank - 1) % w
    mine = _mine(env, 1)
    got = torch.zeros_like(mine)
    # Blocking calls around a ring: if everyone sent first, everyone would wait for a receiver.
    # Rank 0 sends first and every other rank receives first, which breaks the cycle.
    if w > 1:
        if env.rank == 0:
            dist.send(mine, right)
            dist.recv(got, left)
        else:
            dist.recv(got, left)
            dist.send(mine, right)
    else:
        got.copy_(mine)
    show(log, "send/recv around the ring: each rank gets its left neighbour's tensor", mine, got)

    got_async = torch.zeros_like(mine)
    # Non-blocking: post both, then wait; no ordering puzzle. batch_isend_irecv posts them as
    # one group, which NCCL needs when both ends of a pair send before they receive.
    ops = [dist.P2POp(dist.isend, mine, right), dist.P2POp(dist.irecv, got_async, left)]
    for work in dist.batch_isend_irecv(ops) if w > 1 else []:
        work.wait()
    if w == 1:
        got_async.copy_(mine)
    show(log, "isend/irecv around the ring: the same, both posted at once", mine, got_async)
    return {"send_recv": got.item(), "isend_irecv": got_async.item()}


def demo_objects(env: DistEnv, log: logging.Logger, missing: set[str]) -> dict:
    mine = {"rank": env.rank, "word": "x" * (env.rank + 1)}
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    log.info("\n== all_gather_object: any picklable object (pickled into a byte tensor)")
    log.info("   every rank now holds %s", everyone)

    box = [{"lr": 0.1, "from": env.rank}]
    dist.broadcast_object_list(box, src=0)
    log.info("== broadcast_object_list(src=0): every rank now holds %s", box)

    dealt = [None]
    dist.scatter_object_list(
        dealt, [f"card {i}" for i in range(env.world_size)] if env.rank == 0 else None, src=0
    )
    show(log, "scatter_object_list(src=0): rank i gets rank 0's item i", None, dealt)
    return {"all_gather": everyone, "broadcast": box[0], "scatter": dealt[0]}


DEMOS: dict[str, Callable[[DistEnv, logging.Logger, set[str]], object]] = {
    "broadcast": demo_broadcast,
    "reduce": demo_reduce,
    "all_reduce": demo_all_reduce,
    "gather": demo_gather,
    "scatter": demo_scatter,
    "all_gather": demo_all_gather,
    "reduce_scatter": demo_reduce_scatter,
    "all_to_all": demo_all_to_all,
    "barrier": demo_barrier,
    "send_recv": demo_send_recv,
    "objects": demo_objects,
}


def tour(env: DistEnv, names: list[str] | None = None, missing: Collection[str] = ()) -> dict:
    """Run the named demos (all by default) and return {name: this rank's result}."""
    log = rank0_logger(env, "collectives")
    log.info("%d ranks, backend %s, device type %s", env.world_size, env.backend, env.device.type)
    log.info(LEGEND)
    return {name: DEMOS[name](env, log, set(missing)) for name in names or DEMOS}


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__)
    p.add_argument("--only", choices=list(DEMOS), help="run this one demo")
    p.add_argument("--backend", choices=BACKENDS, help="default: nccl with CUDA, else gloo")
    args = p.parse_args(argv)
    with distributed(args.backend) as env:
        threads = choose_threads(env.local_world_size, device=env.device.type)
        rank0_logger(env, "collectives").info(threads)
        return tour(env, [args.only] if args.only else None)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
