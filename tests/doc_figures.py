"""The figures the pages quote (README.md, docs/*.md, pitfalls/README.md) that the code can
recompute in a second or two, deterministically: each sits between `<!-- figure: NAME -->`
and `<!-- /figure -->`, beside the command that prints it, and is written by this module,
never by hand.

    python -m tests.doc_figures            # list the quoted figures that differ from now
    python -m tests.doc_figures --write    # rewrite them in the pages (`make docs`)

tests/test_docs_figures.py fails when a quoted figure differs from what the code prints now.
A figure is a function returning its text: a word or number inside a sentence, or a list of
lines, written as an indented code block (the markers then stand on lines of their own).
Timings and the training runs' figures are not here: they change with the machine's load,
or take minutes."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from functools import cache

from core.dist import distributed
from pitfalls import common, loss_normalization, set_epoch
from tests.doc_commands import PAGES, ROOT

MARK = re.compile(r"<!-- figure: ([\w-]+) -->(.*?)<!-- /figure -->", re.S)


@cache
def _shell(command: str) -> str:
    """What `command`, as the page prints it, writes on stdout, from the repository root."""
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def _set_epoch_results() -> list[str]:
    """`torchrun --nproc-per-node 2 pitfalls/set_epoch.py --wrong` / `--right`: both ranks'
    hashes come from the script's own function, given the rank (no process group needed),
    and its RESULT line as common.report prints it."""
    lines = []
    for right in (False, True):
        every_rank = [set_epoch.epoch_orders(right, rank=r, world_size=2) for r in range(2)]
        mode = "right" if right else "wrong"
        values = {"pitfall": "set_epoch", "mode": mode, **set_epoch.summary(every_rank)}
        lines.append(common.format_result(values))
    return lines


def _loss_error() -> str:
    """`python pitfalls/loss_normalization.py --wrong`: its loss_error, a world of one."""
    with distributed("gloo", timedelta(seconds=60)):
        error = loss_normalization.run(False)["loss_error"]
    return f"`{common.format_result({'loss_error': error}).removeprefix('RESULT ')}`"


PAIR_DIFF = "diff -u train_dp.py train_ddp.py"
FIGURES: dict[str, Callable[[], str | list[str]]] = {
    "pair-diff-lines": lambda: _shell(f"{PAIR_DIFF} | grep -c '^[-+][^-+]'"),
    "pair-diff-hunks": lambda: _shell(f"{PAIR_DIFF} | grep -c '^@@'"),
    "set-epoch-results": _set_epoch_results,
    "loss-normalization-wrong": _loss_error,
}

# The commands on the pages that print a figure themselves: the slow doc-command test checks
# that what they print is what this module computed without running them.
PRINTED_BY = {
    "set-epoch-results": r"pitfalls/set_epoch\.py --(wrong|right)$",
    "loss-normalization-wrong": r"^python pitfalls/loss_normalization\.py --wrong$",
}


@cache
def figure(name: str) -> str:
    """The text that goes between the markers of figure `name`."""
    value = FIGURES[name]()
    if isinstance(value, list):  # a code block of its own, blank lines around it
        return "\n\n" + "".join(f"    {line}\n" for line in value) + "\n"
    return value


def quoted() -> list[tuple[str, str, str]]:
    """(page, name, text) of every figure a page quotes, in page order."""
    return [
        (page, m.group(1), m.group(2))
        for page in PAGES
        for m in MARK.finditer((ROOT / page).read_text())
    ]


def rewrite(page: str) -> bool:
    """Write today's figures into `page`; whether anything changed."""
    path = ROOT / page
    text = path.read_text()
    new = MARK.sub(lambda m: f"<!-- figure: {m[1]} -->{figure(m[1])}<!-- /figure -->", text)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the figures in the pages")
    args = p.parse_args(argv)
    unknown = sorted({f"{page}: {name}" for page, name, _ in quoted() if name not in FIGURES})
    if unknown:
        print(f"error: no such figure: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.write:
        for page in PAGES:
            if rewrite(page):
                print(f"rewrote {page}")
        return 0
    stale = [(page, name) for page, name, text in quoted() if text != figure(name)]
    for page, name in stale:
        print(f"{page}: figure {name} is stale: `python -m tests.doc_figures --write`")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
