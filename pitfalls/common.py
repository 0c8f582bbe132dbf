"""What every pitfall script shares: the `--wrong` / `--right` switch, a process group whose
timeout is seconds rather than the default ten minutes (a deadlock must end while you are
still watching), and one `RESULT key=value ...` line per run, printed by global rank 0, that
a reader can eyeball and a test can parse."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from core.dist import DistEnv, choose_threads, distributed, rank0_logger
from core.errors import run_cli

DEFAULT_TIMEOUT = 5.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def make_parser(doc: str) -> argparse.ArgumentParser:
    """The common command line: exactly one of --wrong / --right, and --timeout."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--wrong", action="store_true", help="reproduce the pitfall")
    mode.add_argument("--right", action="store_true", help="run the fixed version")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"process-group timeout in seconds: how long a collective waits for its peers "
        f"before it fails (default {DEFAULT_TIMEOUT:g})",
    )
    return parser


@contextmanager
def world(args: argparse.Namespace, backend: str | None = "gloo") -> Iterator[DistEnv]:
    """The process group (from torchrun's environment, or a world of one) with --timeout.

    gloo by default, also on GPU machines: most pitfalls are about what the collectives do,
    shown on CPU tensors. `backend=None` picks NCCL when there are GPUs (the pitfalls whose
    point is the device: BatchNorm, map_location)."""
    with distributed(backend, timedelta(seconds=args.timeout)) as env:
        threads = choose_threads(env.local_world_size, device=env.device.type)
        rank0_logger(env, "pitfalls").info(threads)
        yield env


def _token(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return ",".join(_token(v) for v in value)
    return str(value).replace(" ", "_")


def format_result(values: dict) -> str:
    return "RESULT " + " ".join(f"{key}={_token(value)}" for key, value in values.items())


def parse_result(text: str) -> dict[str, str]:
    """The key=value pairs of the last RESULT line in `text` (a script's stdout)."""
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise ValueError("no RESULT line in the output")
    return dict(pair.split("=", 1) for pair in lines[-1].split()[1:])


def report(env: DistEnv, name: str, right: bool, values: dict) -> int:
    """Print the RESULT line on global rank 0 and return the exit status: 1 on global rank 0
    when the run ended in the failure it demonstrates, else 0. (Only rank 0 carries the
    verdict: a rank that exits non-zero first makes torchrun kill the others, rank 0
    included, possibly before it has printed anything.)

    A human-readable `message` is printed on its own line (stderr for a failure), not in the
    RESULT line."""
    values = dict(values)
    message = values.pop("message", None)
    log = rank0_logger(env, "pitfalls")
    log.info(format_result({"pitfall": name, "mode": "right" if right else "wrong", **values}))
    failed = values.get("outcome") in ("timeout", "error")
    if message and env.is_main:
        print(f"error: {message}" if failed else message, file=sys.stderr if failed else sys.stdout)
    return 1 if failed and env.is_main else 0


def cli(main: Callable[[list[str] | None], int]) -> int:
    """Exit status of a pitfall script: 2 for bad flags, 1 when the demonstrated failure
    happened, 0 otherwise."""
    return run_cli(main)  # main's int is the status
