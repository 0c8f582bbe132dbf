"""Pitfall: a collective called on rank 0 only, here the barrier around a checkpoint.

    torchrun --standalone --nproc-per-node 2 pitfalls/rank0_collective.py --wrong --timeout 3
    torchrun --standalone --nproc-per-node 2 pitfalls/rank0_collective.py --right

A collective (barrier, broadcast, all_reduce, ...) completes only when every rank of the
group calls it. The wrong run writes the checkpoint and waits at the barrier inside
`if rank == 0:`; rank 1 skips the branch and goes on to the next collective of its loop (the
all-reduce of a logged metric). Rank 0 waits for a barrier nobody else joins, rank 1 for an
all-reduce rank 0 never reaches: a deadlock, which the process-group timeout turns into an
error on both ranks after --timeout seconds (ten minutes with torch's default timeout).

The fix: write on rank 0, but call the barrier on every rank, outside the branch. After it,
every rank can read the finished file; the right run checks they all load the same numbers.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

import torch
import torch.distributed as dist

from pitfalls import common


def run(right: bool, directory: Path, group: dist.ProcessGroup | None = None) -> dict:
    """Save a checkpoint into `directory` (shared by all ranks) with the barrier inside the
    rank-0 branch (wrong) or after it (right). Needs a process group; `group` (default: the
    whole world) is the one whose timeout ends the deadlock."""
    rank = dist.get_rank(group)
    path = Path(directory) / "checkpoint.pt"
    torch.manual_seed(0)
    state = {"weight": torch.randn(4, 4), "step": 10}
    start = time.monotonic()
    try:
        if rank == 0:
            torch.save(state, path)
            if not right:
                dist.barrier(group=group)  # wrong: only rank 0 ever gets here
        if right:
            dist.barrier(group=group)  # every rank: nobody reads the file before it is whole
        metric = torch.tensor([float(rank + 1)])
        dist.all_reduce(metric, group=group)  # the loop's next collective
    except RuntimeError as e:  # gloo: "Timed out waiting ...ms for recv operation"
        waited = time.monotonic() - start
        first = str(e).strip().splitlines()[0]
        return {
            "outcome": "timeout" if "timed out" in first.lower() else "error",
            "rank": rank,
            "waited_s": round(waited, 1),
            "message": f"rank {rank} gave up after {waited:.1f} s: {first}",
        }
    loaded = torch.load(path, weights_only=True)
    return {
        "outcome": "finished",
        "metric_sum": metric.item(),
        "loaded_matches": bool(torch.equal(loaded["weight"], state["weight"])),
    }


def main(argv: list[str] | None = None) -> int:
    args = common.make_parser(__doc__).parse_args(argv)
    with common.world(args) as env, tempfile.TemporaryDirectory(prefix="pitfall-") as tmp:
        # One directory for all ranks (one machine here): rank 0's, whose name it broadcasts.
        name = [tmp]
        dist.broadcast_object_list(name, src=0)
        values = run(args.right, Path(name[0]))
        if values["outcome"] == "finished":
            dist.barrier()  # nobody is still reading when rank 0 removes the directory
        return common.report(env, "rank0_collective", args.right, values)


if __name__ == "__main__":
    sys.exit(common.cli(main))
