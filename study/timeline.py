"""Where a step's time goes: compute, communication, and how much of one hides the other.

    torchrun --standalone --nproc-per-node 2 train_ddp.py --trace-comm --out-dir runs/t
    python -m study.timeline runs/t            # -> runs/t/timeline.png, runs/t/timeline.json

`train_ddp.py --trace-comm` makes every rank's tracer (comm/tracer.py) write
<out-dir>/timeline/rank<R>.json: per step, the forward, backward and optimizer phases and each
collective's start and end, in seconds from the step's start. This reads them all and

* draws `timeline.png`: one lane per rank, the compute phases in one row and each collective
  (each gradient bucket, each metric reduction) in the row below, for one step;
* writes `timeline.json` with, per rank and in all, over the steps it analyses:
    - `total_s`: the sum of the collectives' durations, exactly what the tracer reported for
      those steps (TensorBoard's comm/seconds); collectives in flight together count twice,
    - `busy_s`: the time during which at least one collective was in flight (their union),
    - `exposed_s`: the part of `busy_s` during which no compute phase ran: communication the
      step waited for,
    - `overlap_fraction`: (busy - exposed) / busy, the share of communication time that was
      hidden behind forward, backward or the optimizer.
  exposed <= busy <= total always.

The first `--skip` steps (default 1) are left out of the numbers: DDP builds its final buckets
after the first backward, and the first step of any run pays for warm-up.

On a CPU box the "hidden" collectives still take CPU time from the computation they overlap
(gloo works in its own threads on the same cores): the fraction says how much communication
the step did not *wait* for, not that it was free.

The times are the host's clock, which sees gloo's transfers but only NCCL's launches: an NCCL
call returns (and its future completes) once its kernel is queued on the GPU, so every
collective would look instant and hidden. Timelines of NCCL runs are refused;
`train_ddp.py --profile` records the GPU's own times (kernels and NCCL transfers per stream).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.cli import Parser, non_negative
from core.errors import UsageError, run_cli

COMPUTE = ("forward", "backward", "optimizer")
COLOURS = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green"}


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The same set of times as disjoint, sorted intervals."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def minus(keep: list[tuple[float, float]], cut: list[tuple[float, float]]) -> float:
    """Length of union(keep) outside union(cut)."""
    keep, cut = union(keep), union(cut)
    covered = 0.0
    for a, b in keep:
        for c, d in cut:
            covered += max(0.0, min(b, d) - max(a, c))
    return length(keep) - covered


def step_numbers(step: dict) -> dict[str, float]:
    """total, busy and exposed communication seconds of one step of one rank."""
    comm = [(c["start"], c["end"]) for c in step["comm"]]
    compute = [(a, b) for name, a, b in step["phases"] if name in COMPUTE]
    return {
        "total_s": sum(c["seconds"] for c in step["comm"]),  # as the tracer adds them up
        "busy_s": length(union(comm)),
        "exposed_s": minus(comm, compute),
    }


def fraction(hidden: float, busy: float) -> float:
    return hidden / busy if busy > 0 else 0.0


def analyse(ranks: list[dict], skip: int) -> dict:
    """The numbers of timeline.json from the ranks' timeline files."""
    per_rank = []
    for r in ranks:
        steps = r["steps"][skip:]
        numbers = [step_numbers(s) for s in steps]
        row = {
            "rank": r["rank"],
            "steps": len(steps),
            "total_s": sum(n["total_s"] for n in numbers),
            "tracer_total_s": sum(s["tracer_seconds"] for s in steps),
            "busy_s": sum(n["busy_s"] for n in numbers),
            "exposed_s": sum(n["exposed_s"] for n in numbers),
            "step_s": sum(s["duration"] for s in steps),
        }
        row["overlap_fraction"] = fraction(row["busy_s"] - row["exposed_s"], row["busy_s"])
        per_rank.append(row)
    out = {k: sum(r[k] for r in per_rank) for k in ("total_s", "busy_s", "exposed_s", "step_s")}
    out["overlap_fraction"] = fraction(out["busy_s"] - out["exposed_s"], out["busy_s"])
    return {"skipped_steps": skip, **out, "per_rank": per_rank}


def load(out_dir: Path) -> list[dict]:
    files = sorted((out_dir / "timeline").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise UsageError(
            f"no timeline in {out_dir}/timeline/: run train_ddp.py --trace-comm "
            f"--out-dir {out_dir} first"
        )
    ranks = []
    for f in files:
        try:
            ranks.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {f}: {e}") from None
        if isinstance(ranks[-1], dict) and ranks[-1].get("backend") == "nccl":
            raise UsageError(
                f"{f} is from an NCCL run, whose collectives the host's clock sees only being "
                "queued (every one would look hidden): use train_ddp.py --profile for GPU times"
            )
    return ranks


def plot(ranks: list[dict], step: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.4 + 1.0 * len(ranks)))
    ticks, labels = [], []
    for lane, r in enumerate(ranks):
        s = r["steps"][step]
        y = -lane * 1.0
        for name, a, b in s["phases"]:
            if name in COMPUTE:
                ax.broken_barh([(a * 1e3, (b - a) * 1e3)], (y + 0.05, 0.4), color=COLOURS[name])
        for i, c in enumerate(s["comm"]):
            ax.broken_barh(
                [(c["start"] * 1e3, (c["end"] - c["start"]) * 1e3)],
                (y - 0.45, 0.4),
                color="tab:red" if i % 2 == 0 else "tab:purple",
                edgecolor="black",
                linewidth=0.4,
            )
        ticks += [y + 0.25, y - 0.25]
        labels += [f"rank {r['rank']} compute", f"rank {r['rank']} collectives"]
    ax.set_yticks(ticks, labels)
    ax.set_xlabel(f"ms from the start of step {step + 1}")
    ax.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[n]) for n in COMPUTE]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:red"))
    ax.legend(
        handles,
        [*COMPUTE, "collectives (alternating colours), each from launch to completion"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12 - 0.3 / len(ranks)),
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="a train_ddp.py --trace-comm output directory")
    p.add_argument(
        "--skip", type=non_negative, default=1, help="first steps left out of the numbers"
    )
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="step to draw, counted from 1 (default: the median-length analysed step of rank 0)",
    )
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    ranks = load(out_dir)
    n_steps = min(len(r["steps"]) for r in ranks)
    if args.skip >= n_steps:
        raise UsageError(f"--skip {args.skip} leaves none of the {n_steps} recorded steps")
    if args.step is None:
        durations = sorted(
            (s["duration"], i) for i, s in enumerate(ranks[0]["steps"][:n_steps]) if i >= args.skip
        )
        step = durations[len(durations) // 2][1]
    elif 1 <= args.step <= n_steps:
        step = args.step - 1
    else:
        raise UsageError(f"--step must be between 1 and {n_steps}")
    result = analyse(ranks, args.skip)
    result["drawn_step"] = step + 1
    title = (
        f"{len(ranks)} ranks; over steps {args.skip + 1}-{n_steps}: communication "
        f"{result['total_s'] * 1e3:.1f} ms, exposed {result['exposed_s'] * 1e3:.1f} ms, "
        f"overlap fraction {result['overlap_fraction']:.2f}"
    )
    plot(ranks, step, out_dir / "timeline.png", title)
    write_json(result, out_dir / "timeline.json")
    print(title)
    print(f"wrote {out_dir / 'timeline.png'} and {out_dir / 'timeline.json'}")
    return result


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
