"""Lab: one desync bug, seen through each tool that diagnoses it.

    python pitfalls/collective_mismatch.py --bug shape --diagnose none
    python pitfalls/collective_mismatch.py --bug one-rank --diagnose detail
    python pitfalls/collective_mismatch.py --bug one-rank --diagnose monitored
    python pitfalls/collective_mismatch.py --bug one-rank --diagnose flight

Every rank runs three "training steps", one all-reduce of a gradient each, and the last rank
has a bug:

* `--bug shape`: in the second step its gradient has 5 elements where the others have 4 (a
  buffer sized from this rank's own data, say);
* `--bug one-rank`: after the second step it alone calls a collective (a broadcast inside an
  `if rank == ...:`), so its third collective is not the others' third.

The lab starts the job itself, under torchrun on 2 CPU processes (gloo), with what the tool
needs set, and prints the command, everything the job printed, then the diagnosis:

* `none`: what you get by default. The shape bug kills rank 0, not the rank with the bug
  (gloo aborts the process that receives more bytes than it expected), and its peer sees
  "Connection reset by peer"; the one-rank bug hangs every rank until the process-group
  timeout, and each says only that a send or recv timed out.
* `detail`: `TORCH_DISTRIBUTED_DEBUG=DETAIL` checks, before every collective, that all ranks
  call the same one (an extra all-gather of a fingerprint on a helper group): both ranks
  report op type, shapes and dtypes on both sides, at once, without waiting for a timeout.
* `monitored`: `dist.monitored_barrier()` at the top of every step. Rank 0 waits for each
  rank in turn and names the ones that did not arrive; it sees presence, not shapes (the shape
  bug passes it).
* `flight`: the flight recorder (`TORCH_FR_BUFFER_SIZE`) records every collective on every
  rank; gloo never dumps it, so each rank dumps it when its collective fails
  (`TORCH_FR_DUMP_TEMP_FILE` names the files), and the lab then runs the repository's reader,
  `python -m tools.frdiff`, on the dumps: the first collective number at which the ranks
  disagree, with each rank's op, shapes and source line. A rank that gloo aborted leaves no
  dump.

`--timeout` (default 3 s) is the process-group timeout, so that the hang ends while you watch;
monitored_barrier gets half of it, so that it reports before the collectives it guards time
out. Run the job directly with `torchrun ... pitfalls/collective_mismatch.py --job --bug ...`
(and the tool's environment variables) to see it without the lab's summary. Exit status: 0
once the job ended and the diagnosis is printed, 1 if the job ran past its deadline, 2 for bad
flags.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root

from core.cli import Parser
from core.errors import UsageError
from core.processes import run_with_deadline
from pitfalls import common

BUGS = ("shape", "one-rank")
TOOLS = ("none", "detail", "monitored", "flight")
STEPS = 3
GRAD = 4  # elements of every rank's gradient, but one
DUMP_PREFIX = "gloo_trace_rank_"
# Seconds the whole job may take, start-up included: a guard against a lab that hangs. The
# process-group timeout ends every variant long before (about 8 s on an idle 2-core box).
DEADLINE = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line errors
    p.description = __doc__  # the whole docstring: its examples are the help
    p.add_argument("--bug", choices=BUGS, default="shape", help="the bug the job has")
    p.add_argument("--diagnose", choices=TOOLS, default="none", help="the tool that looks at it")
    p.add_argument(
        "--timeout",
        type=common._seconds,
        default=3.0,
        help="process-group timeout in seconds (default 3)",
    )
    p.add_argument("--ranks", type=int, choices=range(2, 9), default=2, help="processes (2-8)")
    p.add_argument(
        "--dump-dir",
        type=Path,
        default=Path("runs/flight-recorder"),
        help="where --diagnose flight writes the per-rank dumps (its old dumps are removed)",
    )
    p.add_argument(
        "--job", action="store_true", help="be one rank of the job (the lab runs it this way)"
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- the job


def job(args: argparse.Namespace) -> int:
    """One rank: three steps, the bug on the last rank, the tool's code where it needs some."""
    import torch
    import torch.distributed as dist

    from tools.frdiff import write_dump

    with common.world(args) as env:
        rank, world = env.rank, env.world_size
        if world < 2:
            raise UsageError("the job needs at least 2 ranks: run it under torchrun")
        odd = world - 1  # the rank with the bug
        dump_prefix = (
            os.environ.get("TORCH_FR_DUMP_TEMP_FILE") if args.diagnose == "flight" else None
        )
        dumping = []  # set once this rank has started its dump
        if dump_prefix:
            # torchrun ends the other ranks with SIGTERM once one has died: dump first. (If
            # the dump is under way, let it finish; the rank ends right after it.)
            def dump_and_exit(signum: int, frame: object) -> None:
                if dumping:
                    return
                write_dump(dump_prefix, rank)
                os._exit(128 + signum)

            signal.signal(signal.SIGTERM, dump_and_exit)
        start = time.monotonic()
        try:
            for step in range(STEPS):
                if args.diagnose == "monitored":
                    # Rank 0 waits for every other rank here and names those that do not come.
                    dist.monitored_barrier(timeout=timedelta(seconds=args.timeout / 2))
                size = GRAD + 1 if args.bug == "shape" and step == 1 and rank == odd else GRAD
                grad = torch.full((size,), float(rank + 1))
                dist.all_reduce(grad)  # collectives #1, #2, #3
                if args.bug == "one-rank" and step == 1 and rank == odd:
                    dist.broadcast(torch.zeros(1), src=rank)  # the bug: nobody else calls it
        except RuntimeError as e:
            waited = time.monotonic() - start
            message = str(e).strip()
            print(f"[rank {rank}] after {waited:.1f} s: {message}", flush=True)
            if dump_prefix:
                dumping.append(True)
                path = write_dump(dump_prefix, rank)
                print(f"[rank {rank}] flight recorder dumped to {path}", flush=True)
            # Only rank 0 carries the verdict (as in every pitfall): a rank that exits non-zero
            # first makes torchrun kill the others before they have said anything.
            return 1 if rank == 0 else 0
        expected = world * (world + 1) / 2  # rank r contributes r + 1
        print(f"[rank {rank}] finished: all-reduced gradient {grad.tolist()} (expected {expected})")
        return 0


# ------------------------------------------------------------------------------- the lab


def job_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables the tool needs, set before any process starts."""
    if args.diagnose == "detail":
        return {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    if args.diagnose == "flight":
        return {
            "TORCH_FR_BUFFER_SIZE": "64",  # entries kept per process; 3 steps need 4
            "TORCH_FR_DUMP_TEMP_FILE": f"{args.dump_dir}/{DUMP_PREFIX}",
        }
    return {}


def job_argv(args: argparse.Namespace) -> list[str]:
    # This file as the reader would name it from here (the job runs in the current folder,
    # where --dump-dir is too).
    script = os.path.relpath(os.path.abspath(__file__))
    if script.startswith(".."):
        script = os.path.abspath(__file__)
    return [
        "torchrun", "--standalone", f"--nproc-per-node={args.ranks}", str(script), "--job",
        "--bug", args.bug, "--diagnose", args.diagnose, "--timeout", f"{args.timeout:g}",
    ]  # fmt: skip


TORCHRUN_TRACEBACK = re.compile(
    r"^Traceback \(most recent call last\):\n(?:.*\n)*?.*ChildFailedError: *\n", re.M
)


def shorten(output: str) -> str:
    """The job's output, with torchrun's own traceback (its launcher's frames, the same every
    time) cut to one line; its failure report, which names the ranks and signals, stays."""

    def cut(match: re.Match) -> str:
        return f"[torchrun's own traceback: {match.group(0).count(chr(10))} lines left out]\n"

    return TORCHRUN_TRACEBACK.sub(cut, output)


def diagnosis(args: argparse.Namespace, output: str) -> tuple[list[str], dict]:
    """What the job's output (and, for flight, its dumps) says about the bug."""
    lines, values = [], {}
    killed = re.findall(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*-(\d+)", output)
    signalled = sorted({(int(r), int(s)) for r, s in killed if int(s) != signal.SIGTERM})
    for r, s in signalled:
        lines.append(f"rank {r} was killed by {signal.Signals(s).name} (torchrun's report)")
    values["killed"] = ",".join(str(r) for r, _ in signalled) or "none"
    if args.diagnose == "detail":
        for rank, mine, other, theirs in re.findall(
            r"Rank (\d+) is running collective: CollectiveFingerPrint\((.*?)\)\), "
            r"but Rank (\d+) is running collective: CollectiveFingerPrint\((.*?)\)\)\."
            r"Collectives differ",
            output,
        ):
            lines.append(f"rank {rank} reports: rank {rank} runs {_fingerprint(mine)}, "
                         f"rank {other} runs {_fingerprint(theirs)}")  # fmt: skip
        values["reported"] = len(lines) - len(signalled)
    elif args.diagnose == "monitored":
        # From rank 0's own line of the lab's job (torch also logs the same text once more).
        pattern = r"^\[rank 0\] after .*Ranks? ([\d, ]+) failed to pass monitoredBarrier"
        named = re.findall(pattern, output, re.M)
        for ranks in named:
            lines.append(f"rank 0 names the rank(s) that never reached the barrier: {ranks}")
        if not named and "monitoredBarrier" not in output:
            lines.append("every rank passed each monitored_barrier: it checks presence, not shapes")
        values["named"] = ",".join(r.strip() for r in named) or "none"
    elif args.diagnose == "flight":
        from tools.frdiff import compare, load_dir

        try:
            report, problem = compare(load_dir(args.dump_dir, DUMP_PREFIX))
        except UsageError as e:
            report, problem = [f"no dumps to read: {e}"], True
        lines.append(f"$ python -m tools.frdiff {args.dump_dir}")
        lines += report
        values["desync"] = problem
    else:
        for rank, text in re.findall(r"^\[rank (\d+)\] after [\d.]+ s: (.*)$", output, re.M):
            lines.append(f"rank {rank} says: {_gist(text)}")
        if "terminate called" in output:
            lines.append("gloo aborted a process (see 'terminate called' above): no Python error")
    return lines, values


def _fingerprint(text: str) -> str:
    """'SequenceNumber=2, OpType=BROADCAST, TensorShape=[1], TensorDtypes=Float, ...' ->
    'BROADCAST [1] Float (sequence number 2)'."""
    fields = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", text))
    return (
        " ".join(fields.get(k, "?") for k in ("OpType", "TensorShape", "TensorDtypes"))
        + f" (sequence number {fields.get('SequenceNumber', '?')})"
    )


def _gist(text: str) -> str:
    """The part of a gloo error that says what happened, without its source location."""
    text = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\] ", "", text.splitlines()[0])
    return text.split(". This is typically")[0]


def lab(args: argparse.Namespace) -> int:
    env = job_env(args)
    if args.diagnose == "flight":
        args.dump_dir.mkdir(parents=True, exist_ok=True)
        for old in args.dump_dir.glob(f"{DUMP_PREFIX}*"):
            old.unlink()  # an earlier run's dumps would mix with this one's
    argv = job_argv(args)
    print("$ " + " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *argv]))
    sys.stdout.flush()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_FR_", "TORCH_NCCL_T"))}
    base.pop("TORCH_DISTRIBUTED_DEBUG", None)
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    python_argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    start = time.monotonic()
    status, output, _ = run_with_deadline(
        python_argv, DEADLINE, base, Path.cwd(), merge_stderr=True
    )
    seconds = time.monotonic() - start
    print(shorten(output), end="" if output.endswith("\n") else "\n")
    if status is None:
        print(f"error: the job did not end within {DEADLINE:g} s", file=sys.stderr)
        return 1
    lines, values = diagnosis(args, output)
    print(f"--- diagnosis ({args.diagnose}, bug {args.bug}): the job exited {status} "
          f"after {seconds:.1f} s ---")  # fmt: skip
    print("\n".join(lines) if lines else "nothing names the bug")
    result = {"pitfall": "collective_mismatch", "bug": args.bug, "diagnose": args.diagnose}
    print(common.format_result({**result, "job_status": status, "seconds": round(seconds, 1),
                                **values}))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return job(args) if args.job else lab(args)


if __name__ == "__main__":
    sys.exit(common.cli(main))
