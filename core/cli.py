"""Command-line building blocks for every entry point: a parser whose errors are one line,
and value types that refuse what the code behind a flag cannot represent."""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Callable

from core.errors import UsageError, report_usage_error

# --backend's choices (core/dist.py picks one by default).
BACKENDS = ("nccl", "gloo")


class HelpFormatter(argparse.HelpFormatter):
    """Every default shown once: appended as "(default: X)" unless the help text already
    says what the default is, or there is none to show (None, a False switch). Lines are
    wrapped between words only: a path or a flag such as --out-dir is never split at its
    hyphens."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
            break_on_hyphens=False,
        )  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and complete help: `description` may be a module's whole
    docstring, of which the first paragraph is shown."""

    def __init__(self, *args, description: str | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if description:
            description = description.strip().split("\n\n")[0]
        super().__init__(*args, description=description, **kwargs)

    def error(self, message: str):  # argparse would print the whole usage block first
        raise UsageError(f"{message} (see --help)")


def parse_or_exit(
    parse: Callable[[list[str] | None], argparse.Namespace], argv: list[str] | None = None
) -> argparse.Namespace:
    """`parse(argv)`, or its usage error as run_cli reports it (one line, exit status 2)
    without run_cli, which brings torch with it: a script calls this before `import torch`,
    so that a bad flag is answered at once (torch takes seconds to load)."""
    try:
        return parse(argv)
    except UsageError as e:
        raise SystemExit(report_usage_error(e)) from None


def _number(value: str, kind: type) -> int | float:
    """`kind(value)`, or the refusal argparse shows as it is (else it would name the type
    function: "invalid non_negative value")."""
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def positive(value: str) -> int:
    n = _number(value, int)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """An integer type for argparse that accepts `low` to `high`, both included: the range
    the code behind the flag can represent (a seed for torch and NumPy generators, seconds
    for a timedelta and the C++ side's milliseconds), so a huge value is refused in one line
    rather than overflowing somewhere later."""

    def parse(value: str) -> int:
        n = _number(value, int)
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low} to {high}, got {value}")
        return n

    return parse


def non_negative(value: str) -> int:
    n = _number(value, int)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return n


def non_negative_float(value: str) -> float:
    x = _number(value, float)
    if not (x >= 0 and math.isfinite(x)):  # also refuses nan, for which every comparison fails
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {value}")
    return x


def positive_float(value: str) -> float:
    x = _number(value, float)
    if not (x > 0 and math.isfinite(x)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value}")
    return x


def unit_float(value: str) -> float:
    x = _number(value, float)
    if not 0 <= x < 1:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return x


def out_dir(value: str) -> str:
    # Path("") is the current directory: an empty value (an unset shell variable) would
    # scatter a run's files there.
    if not value.strip():
        raise argparse.ArgumentTypeError("needs a folder name, got an empty string")
    return value
