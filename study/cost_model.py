"""The alpha-beta cost model of all-reduce: fit it to study.bench, predict with the formulas.

    python -m study.cost_model fit bench_out/bench.csv       # t = alpha + beta x bytes per op
    python -m study.cost_model predict --op all_reduce --algo tree --world 64 --bytes 1M
    python -m study.cost_model pick bench_out/bench.csv      # does the model pick the fastest?
    python -m study.cost_model ddp bench_out/bench.csv runs/ddp-trace   # a DDP step's communication
    python -m study.cost_model extrapolate --plot docs/cost-model.png   # 8 to 1024 ranks, on paper

A message of n bytes between two ranks costs alpha + n x beta: alpha is the fixed cost of a
message (latency, software overhead), 1/beta the bandwidth. An algorithm's all-reduce time on
p ranks is then A x alpha + B x n x beta, where A counts the messages on its critical path
and B the bytes per rank in units of n. From Thakur, Rabenseifner and Gropp, "Optimization of
Collective Communication Operations in MPICH" (IJHPCA 19(1), 2005), without the
reduction's computation term (gamma), with lg the base-2 logarithm and p' = 2^floor(lg p):

    ring    2(p-1) alpha     + 2(p-1)/p n beta     reduce-scatter + all-gather, p-1 steps each
    tree    2 ceil(lg p) (alpha + n beta)          binomial reduce + binomial broadcast
    rhd     2 lg p' alpha    + 2(p'-1)/p' n beta   Rabenseifner: halving + doubling,
            + 2 (alpha + n beta) if p != p'        + one whole-tensor message each side of the fold
    naive   2(p-1) (alpha + n beta)                the root receives and sends p-1 tensors

`fit` fits t = alpha + beta x bytes to each op of a study.bench CSV separately (the op's own
latency and bandwidth, whatever its algorithm). `pick` fits one link alpha and beta to all the
hand-made algorithms at once through the formulas above, and asks, size by size, whether the
formulas with that one link pick the algorithm that was measured fastest.

Fits minimise the relative error (weights 1/t^2): sizes span five decades, and an ordinary
least-squares line would fit the largest messages and leave alpha to chance. R^2 is computed
in the same weighted sense.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.cli import Parser, bounded_int, positive_float
from core.errors import UsageError, run_cli
from core.files import read_bounded, writing

ALGORITHMS = ("ring", "tree", "rhd", "naive")
# study.bench's op names -> (collective, algorithm); "gloo" is the library's own all_reduce.
BENCH_OPS = {
    "all_reduce": ("all_reduce", "gloo"),
    "ring_all_reduce": ("all_reduce", "ring"),
    "tree_all_reduce": ("all_reduce", "tree"),
    "rhd_all_reduce": ("all_reduce", "rhd"),
    "naive_all_reduce": ("all_reduce", "naive"),
}
REQUIRED = ("op", "bytes", "world_size", "backend", "time_us")

# The extrapolation's datacentre link: ASSUMED, not measured (about a 200 Gb/s NIC per GPU
# and a few microseconds of latency per message through NCCL's stack).
DATACENTRE_ALPHA_US = 5.0
DATACENTRE_GBPS = 25.0
# ASSUMED compute time of one training step on one datacentre GPU (forward + backward +
# optimizer), of which backward is BACKWARD_SHARE: the CIFAR-sized default cnn at batch 32,
# and resnet18 on 32x32 images at batch 128.
STEP_MS = {"cnn": 1.0, "resnet18": 40.0}
BACKWARD_SHARE = 2 / 3
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
DDP_BUCKET_BYTES = 25 * 2**20


# ---- the formulas -----------------------------------------------------------------------------


def terms(algo: str, world: int) -> tuple[float, float]:
    """(A, B) of the all-reduce time A x alpha + B x n x beta (see the module docstring)."""
    p = world
    if p < 1:
        raise UsageError(f"world size must be 1 or more, got {world}")
    if p == 1:
        return 0.0, 0.0
    lg = (p - 1).bit_length()  # ceil(lg p)
    if algo == "ring":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p
    if algo == "tree":
        return 2.0 * lg, 2.0 * lg
    if algo == "rhd":
        q = 1 << (p.bit_length() - 1)  # p'
        fold = 2.0 if q != p else 0.0
        return 2.0 * math.log2(q) + fold, 2.0 * (q - 1) / q + fold
    if algo == "naive":
        return 2.0 * (p - 1), 2.0 * (p - 1)
    raise UsageError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")


def predict(algo: str, world: int, nbytes: float, alpha: float, beta: float) -> float:
    """Seconds of one all-reduce of `nbytes` on `world` ranks (alpha in s, beta in s/byte)."""
    a, b = terms(algo, world)
    return a * alpha + b * nbytes * beta


# ---- fitting ----------------------------------------------------------------------------------


@dataclass
class Fit:
    alpha: float  # seconds
    beta: float  # seconds per byte
    r2: float
    points: int

    @property
    def gbps(self) -> float:
        return 1e-9 / self.beta if self.beta > 0 else math.inf


def least_squares(u: list[float], v: list[float], t: list[float]) -> tuple[float, float, float]:
    """(c, d, R^2) minimising sum ((t - c u - d v) / t)^2: the closed-form 2x2 normal
    equations of the relative-error fit. With u = 1 and v = bytes, c is alpha and d beta."""
    w = [1 / x**2 for x in t]
    suu = sum(wi * a * a for wi, a in zip(w, u, strict=True))
    suv = sum(wi * a * b for wi, a, b in zip(w, u, v, strict=True))
    svv = sum(wi * b * b for wi, b in zip(w, v, strict=True))
    sut = sum(wi * a * x for wi, a, x in zip(w, u, t, strict=True))
    svt = sum(wi * b * x for wi, b, x in zip(w, v, t, strict=True))
    det = suu * svv - suv**2
    if len(t) < 2 or det <= 1e-12 * suu * svv:
        raise UsageError("a fit needs at least two distinct message sizes")
    c = (svv * sut - suv * svt) / det
    d = (suu * svt - suv * sut) / det
    mean = sum(wi * x for wi, x in zip(w, t, strict=True)) / sum(w)
    residual = sum(wi * (x - c * a - d * b) ** 2 for wi, a, b, x in zip(w, u, v, t, strict=True))
    total = sum(wi * (x - mean) ** 2 for wi, x in zip(w, t, strict=True))
    return c, d, 1 - residual / total if total > 0 else 1.0


def fit_line(nbytes: list[float], seconds: list[float]) -> Fit:
    """t = alpha + beta x bytes."""
    alpha, beta, r2 = least_squares([1.0] * len(nbytes), nbytes, seconds)
    return Fit(alpha, beta, r2, len(nbytes))


# World sizes the formulas are asked about (the extrapolation's largest is 1024).
WORLD = bounded_int(1, 1 << 20, "--world")
# A study.bench CSV has a row per op and size (a few hundred, ~100 bytes each): far below.
MAX_CSV_BYTES = 64 << 20
MAX_JSON_BYTES = 256 << 20  # a run's summary.json, one rank's timeline


def read_bench(path: Path) -> list[dict]:
    """The rows of a study.bench CSV, numbers parsed; a UsageError names what is wrong.
    Only a regular file of at most MAX_CSV_BYTES is read (/dev/zero or a fifo never ends)."""
    raw = read_bounded(path, MAX_CSV_BYTES, "a study.bench CSV")
    try:
        with io.StringIO(raw.decode(), newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(
                    f"{path} is not a study.bench CSV (no column {', '.join(missing)})"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    parsed = {
                        "op": row["op"],
                        "backend": row["backend"],
                        "bytes": int(row["bytes"]),
                        "world_size": int(row["world_size"]),
                        "seconds": float(row["time_us"]) * 1e-6,
                    }
                except (TypeError, ValueError):
                    raise UsageError(
                        f"{path}, line {line}: not a number where one belongs"
                    ) from None
                if (
                    parsed["bytes"] <= 0
                    or not 0 < parsed["seconds"] < math.inf
                    or parsed["world_size"] < 1
                ):
                    raise UsageError(
                        f"{path}, line {line}: sizes, times and ranks must be positive and finite"
                    )
                rows.append(parsed)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path} is not a CSV file: {e}") from None
    if not rows:
        raise UsageError(f"{path} holds no measurements")
    return rows


def fit_bench(rows: list[dict]) -> dict[tuple[str, int, str], Fit]:
    """One fit per (op, world size, backend) with at least two sizes."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["world_size"], r["backend"]), []).append(r)
    fits = {}
    for key, mine in groups.items():
        if len({r["bytes"] for r in mine}) >= 2:
            fits[key] = fit_line([r["bytes"] for r in mine], [r["seconds"] for r in mine])
    if not fits:
        raise UsageError("no op was measured at two sizes or more: nothing to fit")
    return fits


def fit_link(rows: list[dict], world: int) -> Fit:
    """One link alpha and beta for all the hand-made all-reduces at `world` ranks: the fit of
    t = A alpha + B n beta with each algorithm's (A, B)."""
    mine = [r for r in rows if r["world_size"] == world and r["op"] in BENCH_OPS]
    mine = [r for r in mine if BENCH_OPS[r["op"]][1] in ALGORITHMS]
    if not mine:
        raise UsageError(f"no hand-made all-reduce measured at {world} ranks")
    u, v = [], []
    for r in mine:
        a, b = terms(BENCH_OPS[r["op"]][1], world)
        u.append(a)
        v.append(b * r["bytes"])
    alpha, beta, r2 = least_squares(u, v, [r["seconds"] for r in mine])
    return Fit(alpha, beta, r2, len(mine))


# ---- the DDP step ---------------------------------------------------------------------------


def ddp_comm_seconds(grad_bytes: float, buckets: int, alpha: float, beta: float) -> float:
    """Seconds of one step's gradient all-reduces without overlap: alpha per bucket plus beta
    per gradient byte, with alpha and beta those of the all-reduce itself."""
    return buckets * alpha + beta * grad_bytes


# train_ddp.py's preemption check (training/preempt.py): one all-reduce of an int32 after
# every optimizer step, the last collective of the step, which is no gradient communication.
PREEMPT_CHECK_BYTES = 4


def gradient_collectives(comm: list[dict]) -> list[dict]:
    """A step's traced collectives without the preemption check that ends it."""
    last = comm[-1] if comm else None
    if last and last.get("name") == "all_reduce" and last["bytes"] == PREEMPT_CHECK_BYTES:
        return comm[:-1]
    return comm


def traced_step_seconds(run_dir: Path) -> tuple[int, int, list[list[float]]]:
    """(gradient bytes, buckets, [seconds of each rank] per step) of the gradient
    communication of a `train_ddp.py --trace-comm` run, from its timeline: the steps whose
    collectives carry exactly the gradient bytes on every rank (no metric reduction on
    them), the first step (warm-up) left out."""
    try:
        summary = json.loads(read_bounded(run_dir / "summary.json", MAX_JSON_BYTES, "a summary"))
        grad_bytes = int(summary["comm"]["model_grad_bytes"])
        files = sorted((run_dir / "timeline").glob("rank*.json"))
        ranks = [json.loads(read_bounded(f, MAX_JSON_BYTES, "a timeline"))["steps"] for f in files]
        steps, buckets = [], set()
        for i in range(1, min(len(r) for r in ranks) if ranks else 0):
            comms = [gradient_collectives(r[i]["comm"]) for r in ranks]
            if all(sum(c["bytes"] for c in comm) == grad_bytes for comm in comms):
                steps.append([sum(c["seconds"] for c in comm) for comm in comms])
                buckets.update(len(comm) for comm in comms)
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:
        raise UsageError(
            f"{run_dir} is not a finished train_ddp.py --trace-comm run ({type(e).__name__}: {e})"
        ) from None
    if not ranks:
        raise UsageError(f"no timeline in {run_dir}/timeline/: run with --trace-comm")
    if not steps or len(buckets) != 1:
        raise UsageError(f"{run_dir}: no step with only gradient all-reduces to compare")
    return grad_bytes, buckets.pop(), steps


def exposed_seconds(
    grad_bytes: float,
    bucket_bytes: float,
    backward_s: float,
    algo: str,
    world: int,
    alpha: float,
    beta: float,
) -> float:
    """Communication left after backward when buckets are all-reduced one after the other as
    soon as they are full, the gradients becoming ready at a steady rate during backward (a
    DDP-like overlap; `algo` "best" takes the fastest formula for each bucket)."""
    buckets = max(math.ceil(grad_bytes / bucket_bytes), 1)
    done = 0.0
    for i in range(1, buckets + 1):
        size = min(bucket_bytes, grad_bytes - (i - 1) * bucket_bytes)
        ready = backward_s * min(i * bucket_bytes, grad_bytes) / grad_bytes
        algos = ALGORITHMS[:3] if algo == "best" else (algo,)
        done = max(done, ready) + min(predict(a, world, size, alpha, beta) for a in algos)
    return done - backward_s


def param_bytes(name: str) -> int:
    """Float32 gradient bytes of a training/models.py model on 3x32x32 inputs, 10 classes."""
    from training.models import build_model

    return 4 * sum(p.numel() for p in build_model(name, 3, 32, 10).parameters())


BUCKET_GRID = [round(2 ** (k / 4)) for k in range(64, 121)]  # 64 KiB ... 1 GiB, 4 per octave


def best_bucket(
    grad_bytes: float, backward_s: float, algo: str, world: int, alpha: float, beta: float
) -> tuple[float, float]:
    """(bucket bytes, exposed seconds) of the bucket size in BUCKET_GRID (up to one bucket
    for everything) that leaves the least communication exposed."""
    grid = [b for b in BUCKET_GRID if b < grad_bytes] + [grad_bytes]
    return min(
        ((b, exposed_seconds(grad_bytes, b, backward_s, algo, world, alpha, beta)) for b in grid),
        key=lambda x: x[1],
    )


# ---- commands -------------------------------------------------------------------------------


def human(nbytes: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g}{unit}"
    return f"{nbytes:.0f}"


def windowed(args) -> list[dict]:
    """The CSV's rows from --min-bytes up: a line fits one regime (in cache or not) at a time."""
    from study.bench import parse_size

    least = parse_size(args.min_bytes) if args.min_bytes else 0
    rows = [r for r in read_bench(Path(args.csv)) if r["bytes"] >= least]
    if not rows:
        raise UsageError(f"{args.csv} has no size from --min-bytes {args.min_bytes} up")
    return rows


def cmd_fit(args) -> dict:
    fits = fit_bench(windowed(args))
    print(
        f"{'op':>18} {'algo':>6} {'W':>3} {'backend':>7} {'alpha(us)':>10} "
        f"{'1/beta(GB/s)':>13} {'R^2':>7} {'sizes':>5}"
    )
    for (op, world, backend), f in sorted(fits.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        algo = BENCH_OPS.get(op, (op, "-"))[1]
        print(
            f"{op:>18} {algo:>6} {world:>3} {backend:>7} {f.alpha * 1e6:>10.1f} "
            f"{f.gbps:>13.3f} {f.r2:>7.3f} {f.points:>5}"
        )
    return {f"{op}/W{w}/{b}": vars(f) for (op, w, b), f in fits.items()}


def cmd_predict(args) -> float:
    from study.bench import parse_size

    if args.op != "all_reduce":
        raise UsageError(f"only --op all_reduce has formulas here, got {args.op!r}")
    nbytes = parse_size(args.bytes)
    seconds = predict(args.algo, args.world, nbytes, args.alpha_us * 1e-6, 1e-9 / args.gbps)
    a, b = terms(args.algo, args.world)
    print(
        f"all_reduce {args.algo} on {args.world} ranks, {human(nbytes)}B: "
        f"{a:g} x {args.alpha_us:g} us + {b:.4g} x {nbytes} B / {args.gbps:g} GB/s "
        f"= {seconds * 1e6:.1f} us"
    )
    return seconds


def measured_table(rows: list[dict], world: int) -> dict[int, dict[str, float]]:
    """size -> {algorithm: seconds} of the hand-made all-reduces at `world` ranks, for the
    sizes where every one of ALGORITHMS was measured."""
    table: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["world_size"] == world and BENCH_OPS.get(r["op"], ("", ""))[1] in ALGORITHMS:
            table.setdefault(r["bytes"], {})[BENCH_OPS[r["op"]][1]] = r["seconds"]
    return {n: t for n, t in sorted(table.items()) if len(t) == len(ALGORITHMS)}


def pick(rows: list[dict], world: int) -> list[dict]:
    """Per size: the measured fastest algorithm and two predictions of it,
    - "textbook": the formulas with one link alpha/beta fitted to all algorithms at once;
    - "own_lines": each algorithm's own alpha + beta x bytes line, fitted to its other
      sizes only (leave one out), so that no size predicts itself."""
    table = measured_table(rows, world)
    if len(table) < 3:
        raise UsageError(
            f"pick needs 3 sizes or more with all of {', '.join(ALGORITHMS)} at {world} ranks"
        )
    link = fit_link(rows, world)
    out = []
    for n, measured in table.items():
        textbook = {a: predict(a, world, n, link.alpha, link.beta) for a in ALGORITHMS}
        own = {}
        for a in ALGORITHMS:
            others = [m for m in table if m != n]
            f = fit_line(others, [table[m][a] for m in others])
            own[a] = f.alpha + f.beta * n
        out.append(
            {
                "bytes": n,
                "measured": measured,
                "textbook": textbook,
                "own_lines": own,
                "fastest": min(measured, key=measured.get),
                "textbook_pick": min(textbook, key=textbook.get),
                "own_lines_pick": min(own, key=own.get),
            }
        )
    return out


def cmd_pick(args) -> dict[str, float]:
    rows = read_bench(Path(args.csv))
    link = fit_link(rows, args.world)
    fits = fit_bench(rows)
    print(f"per algorithm at {args.world} ranks: its own fit, and the link it implies")
    print(
        f"{'algo':>6} {'A':>5} {'B':>5} {'alpha(us)':>10} {'1/beta(GB/s)':>13} "
        f"{'alpha/A(us)':>12} {'B/beta(GB/s)':>13}"
    )
    for a in ALGORITHMS:
        f = fits.get((f"{a}_all_reduce", args.world, "gloo"))
        if f is not None:
            na, nb = terms(a, args.world)
            print(
                f"{a:>6} {na:>5g} {nb:>5.3g} {f.alpha * 1e6:>10.1f} {f.gbps:>13.3f} "
                f"{f.alpha / na * 1e6:>12.1f} {f.gbps * nb:>13.3f}"
            )
    print(
        f"one link for all of them (textbook): alpha {link.alpha * 1e6:.1f} us, "
        f"1/beta {link.gbps:.3f} GB/s, R^2 {link.r2:.3f}"
    )
    result = pick(rows, args.world)
    names = " ".join(f"{a:>8}" for a in ALGORITHMS)
    print(f"{'size':>8} {names}   fastest  textbook  own lines")
    print(f"{'':>8} " + " ".join(f"{'(ms)':>8}" for _ in ALGORITHMS))
    for r in result:
        cells = " ".join(f"{r['measured'][a] * 1e3:>8.2f}" for a in ALGORITHMS)
        marks = [
            r[k] + ("" if r[k] == r["fastest"] else " x")
            for k in ("textbook_pick", "own_lines_pick")
        ]
        print(f"{human(r['bytes']):>8} {cells}   {r['fastest']:>7}  {marks[0]:>8}  {marks[1]:>9}")
    scores = {}
    for key, what in (
        ("textbook", "the textbook formulas with one link"),
        ("own_lines", "each algorithm's own line, fitted without that size"),
    ):
        right = sum(r[f"{key}_pick"] == r["fastest"] for r in result)
        scores[key] = right / len(result)
        print(f"{what}: the measured fastest at {right} of {len(result)} sizes ({scores[key]:.0%})")
    return scores


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def cmd_ddp(args) -> dict[str, float]:
    """The model's time for the run's buckets against two readings of the tracer: every
    rank's time (what comm/seconds shows), which includes waiting for the ranks still in
    backward; and per step the last rank to arrive, which waits for nobody: the
    collective's own duration. Two fits predict: the op's line over all sizes, and the line
    over the sizes within --window x of the bucket (this machine has two regimes: messages
    that fit in the CPU caches and messages that do not)."""
    rows = read_bench(Path(args.csv))
    grad_bytes, buckets, steps = traced_step_seconds(Path(args.run))
    world, bucket = len(steps[0]), grad_bytes / buckets
    mine = [r for r in rows if (r["op"], r["world_size"]) == (args.op, world)]
    near = [r for r in mine if bucket / args.window <= r["bytes"] <= bucket * args.window]
    if len({r["bytes"] for r in near}) < 2:
        raise UsageError(
            f"{args.csv} has fewer than two sizes of {args.op} at {world} ranks within "
            f"{args.window:g}x of the {bucket:.0f}-byte bucket"
        )
    every = median([s for step in steps for s in step])
    last = median([min(step) for step in steps])
    print(
        f"{world} ranks, {grad_bytes} gradient bytes in {buckets} bucket(s); traced, median "
        f"of {len(steps)} steps: every rank {every * 1e3:.2f} ms, the last rank to arrive "
        f"{last * 1e3:.2f} ms"
    )
    ratios = {}
    for name, chosen in (("all sizes", mine), (f"sizes within {args.window:g}x", near)):
        f = fit_line([r["bytes"] for r in chosen], [r["seconds"] for r in chosen])
        predicted = ddp_comm_seconds(grad_bytes, buckets, f.alpha, f.beta)
        ratios[name] = {"every_rank": every / predicted, "last_rank": last / predicted}
        print(
            f"{args.op} fit on {name} ({len(chosen)}): alpha {f.alpha * 1e6:.1f} us, "
            f"1/beta {f.gbps:.3f} GB/s -> {buckets} x alpha + beta x bytes = "
            f"{predicted * 1e3:.2f} ms; measured / predicted: every rank "
            f"{every / predicted:.2f}, last rank {last / predicted:.2f}"
        )
    return ratios


def crossover(world: int, other: str, alpha: float, beta: float) -> float:
    """Bytes below which `other` beats the ring: 0.0 if it never does, inf if it always does
    (the same bandwidth term and fewer messages, as rhd on a power of two)."""
    a1, b1 = terms("ring", world)
    a2, b2 = terms(other, world)
    if a2 >= a1:
        return 0.0
    if b2 <= b1:
        return math.inf
    return (a1 - a2) * alpha / ((b2 - b1) * beta)


def _below(nbytes: float) -> str:
    return "never" if nbytes == 0 else "always" if math.isinf(nbytes) else human(nbytes) + "B"


def cmd_extrapolate(args) -> dict:
    alpha, beta = args.alpha_us * 1e-6, 1e-9 / args.gbps
    print(f"ASSUMED link: alpha {args.alpha_us:g} us per message, {args.gbps:g} GB/s per rank")
    print(f"{'ranks':>6} {'tree beats ring below':>22} {'rhd beats ring below':>21}")
    out: dict = {"crossover": {}, "models": {}}
    for p in RANKS:
        tree, rhd = crossover(p, "tree", alpha, beta), crossover(p, "rhd", alpha, beta)
        out["crossover"][p] = {"tree": tree, "rhd": rhd}
        print(f"{p:>6} {_below(tree):>22} {_below(rhd):>21}")
    for name, step_ms in STEP_MS.items():
        grad = param_bytes(name)
        step, backward = step_ms * 1e-3, step_ms * 1e-3 * BACKWARD_SHARE
        print(
            f"\n{name}: {grad / 4:,.0f} parameters, {human(grad)}B of gradients; ASSUMED "
            f"{step_ms:g} ms compute per step, backward {BACKWARD_SHARE:.0%} of it; "
            f"exposed communication (ms) and efficiency = compute / (compute + exposed)"
        )
        print(
            f"{'ranks':>6} {'ring, 25M buckets':>16} {'ring, best bucket':>26} "
            f"{'best algorithm and bucket':>26}"
        )
        head = f" {'bucket':>9} {'exposed':>9} {'eff':>6}"
        print(f"{'':>6} {'exposed':>9} {'eff':>6}{head}{head}")
        rows = {}
        for p in RANKS:
            ring = exposed_seconds(grad, DDP_BUCKET_BYTES, backward, "ring", p, alpha, beta)
            ring_bucket, ring_best = best_bucket(grad, backward, "ring", p, alpha, beta)
            bucket, best = best_bucket(grad, backward, "best", p, alpha, beta)
            rows[p] = {
                "ring_25M_exposed_s": ring,
                "ring_25M_efficiency": step / (step + ring),
                "ring_best_bucket_bytes": ring_bucket,
                "ring_best_exposed_s": ring_best,
                "ring_best_efficiency": step / (step + ring_best),
                "best_bucket_bytes": bucket,
                "best_exposed_s": best,
                "best_efficiency": step / (step + best),
            }
            cells = [f"{ring * 1e3:>9.3f} {step / (step + ring):>6.1%}"]
            for b, e in ((ring_bucket, ring_best), (bucket, best)):
                cells.append(f"{human(b):>9} {e * 1e3:>9.3f} {step / (step + e):>6.1%}")
            print(f"{p:>6} " + " ".join(cells))
        out["models"][name] = {"grad_bytes": grad, "step_ms": step_ms, "ranks": rows}
    if args.plot:
        plot(out, alpha, beta, Path(args.plot))
        print(f"\nwrote {args.plot}")
    return out


def plot(out: dict, alpha: float, beta: float, path: Path) -> None:
    """Left: predicted all-reduce time against size at 8 and 1024 ranks, per algorithm.
    Right: scaling efficiency of the two models against the number of ranks."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = [2.0**k for k in range(10, 31)]
    for p, style in ((8, "--"), (1024, "-")):
        for algo, colour in zip(
            ALGORITHMS[:3], ("tab:blue", "tab:orange", "tab:green"), strict=True
        ):
            left.plot(
                sizes,
                [predict(algo, p, n, alpha, beta) * 1e3 for n in sizes],
                style,
                color=colour,
                label=f"{algo}, {p} ranks",
            )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("all-reduce size (bytes)")
    left.set_ylabel("predicted time (ms)")
    left.set_title("all-reduce time by algorithm")
    left.legend(fontsize=8)
    for name, colour in zip(out["models"], ("tab:purple", "tab:red"), strict=True):
        ranks = out["models"][name]["ranks"]
        xs = list(ranks)
        right.plot(
            xs,
            [ranks[p]["best_efficiency"] for p in xs],
            "-o",
            color=colour,
            label=f"{name}: best algorithm and bucket",
        )
        right.plot(
            xs,
            [ranks[p]["ring_best_efficiency"] for p in xs],
            "-.",
            color=colour,
            label=f"{name}: ring, best bucket",
        )
        right.plot(
            xs,
            [ranks[p]["ring_25M_efficiency"] for p in xs],
            "--",
            color=colour,
            label=f"{name}: ring, 25 MiB buckets",
        )
    right.set_xscale("log", base=2)
    right.set_ylim(0, 1.05)
    right.set_xlabel("ranks")
    right.set_ylabel("scaling efficiency (compute / step)")
    right.set_title("weak scaling, exposed communication only")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"alpha-beta model, ASSUMED datacentre link: alpha {alpha * 1e6:g} us, {1e-9 / beta:g} GB/s"
    )
    fig.tight_layout()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> object:
    p = Parser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit t = alpha + beta x bytes to each op of a study.bench CSV")
    f.add_argument("csv", help="a study.bench CSV (bench_out/bench.csv)")
    f.add_argument("--min-bytes", help="fit the sizes from this one up (e.g. 1M; default: all)")
    f.set_defaults(handler=cmd_fit)
    q = sub.add_parser("predict", help="one all-reduce time from the textbook formulas")
    q.add_argument("--op", default="all_reduce", help="the collective (only all_reduce)")
    q.add_argument("--algo", choices=ALGORITHMS, default="ring", help="the algorithm")
    q.add_argument("--world", type=WORLD, required=True, help="number of ranks")
    q.add_argument("--bytes", required=True, help="message size (e.g. 4096, 64K, 16M)")
    q.add_argument(
        "--alpha-us",
        type=positive_float,
        default=DATACENTRE_ALPHA_US,
        help="alpha in us (default: the assumed datacentre link)",
    )
    q.add_argument("--gbps", type=positive_float, default=DATACENTRE_GBPS, help="1/beta in GB/s")
    q.set_defaults(handler=cmd_predict)
    k = sub.add_parser(
        "pick", help="does one fitted link make the formulas pick the measured fastest algorithm?"
    )
    k.add_argument("csv", help="a study.bench CSV with ring/tree/rhd/naive_all_reduce")
    k.add_argument("--world", type=WORLD, default=4, help="the world size to look at")
    k.set_defaults(handler=cmd_pick)
    d = sub.add_parser("ddp", help="a DDP step's communication: model against the tracer")
    d.add_argument("csv", help="a study.bench CSV measured on the run's world size")
    d.add_argument("run", help="a train_ddp.py --trace-comm output directory")
    d.add_argument("--op", default="all_reduce", help="the CSV op whose fit predicts the buckets")
    d.add_argument(
        "--window",
        type=positive_float,
        default=4.0,
        help="the local fit takes sizes within this factor",
    )
    d.set_defaults(handler=cmd_ddp)
    e = sub.add_parser("extrapolate", help="8 to 1024 ranks on an assumed datacentre link")
    e.add_argument(
        "--alpha-us", type=positive_float, default=DATACENTRE_ALPHA_US, help="alpha in us"
    )
    e.add_argument("--gbps", type=positive_float, default=DATACENTRE_GBPS, help="1/beta in GB/s")
    e.add_argument("--plot", help="write the plot here (PNG)")
    e.set_defaults(handler=cmd_extrapolate)
    args = p.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
