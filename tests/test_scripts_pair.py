"""train_dp.py and train_ddp.py differ only where DataParallel and DDP differ.

The two scripts are read side by side (`diff -u train_dp.py train_ddp.py`), so every line
they share must read the same in both. tests/pair_hunks.txt lists the hunks in which they
may differ, each under a `## why` line; this test fails when they differ anywhere else, or
differently there: a shared line edited in one script only, or a lesson hunk changed without
its entry. After a deliberate change, `python -m tests.test_scripts_pair` prints the hunks as they
are now, in the file's format, with the reasons of the hunks that have not changed.

The diff also stays short enough to read (at most MAX_CHANGED_LINES changed lines, the figure
docs/dp-vs-ddp.md quotes) and keeps showing what DDP changes, in the order train_ddp.py
reads (LESSON).
"""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUNKS = Path(__file__).with_name("pair_hunks.txt")

Hunk = tuple[tuple[str, ...], tuple[str, ...]]  # train_dp.py's lines, train_ddp.py's lines

# docs/dp-vs-ddp.md's figure is `diff -u train_dp.py train_ddp.py | grep -c '^[-+][^-+]'`; the
# issue that shortened the diff (the repository's own extensions entering train_ddp.py
# through single lines, the loop's bookkeeping in training/loop.py) set this bound.
MAX_CHANGED_LINES = 150
CHANGED = re.compile(r"^[-+][^-+]")  # the grep: no blank lines, no lines that start with -/+

# What DDP changes, as train_ddp.py's side of the diff must show it, in reading order:
# (what, a piece of the changed line that shows it).
LESSON = [
    ("torchrun's environment", "env = resolve("),
    ("one GPU per process, before the group", "torch.cuda.set_device(env.device)"),
    ("the process group", "dist.init_process_group("),
    ("its explicit timeout", "timeout=timedelta(seconds=args.timeout)"),
    ("teardown on a clean exit", "dist.destroy_process_group()"),
    ("a rank-0 guard: the download", "env.is_main"),
    ("DistributedSampler's shard: how many", "num_replicas=env.world_size"),
    ("DistributedSampler's shard: which", "rank=env.rank"),
    ("the DDP wrapper", "model = DDP(model"),
    ("a new permutation every epoch", "sampler.set_epoch(epoch)"),
    ("no all-reduce on accumulation micro-steps", "no_sync()"),
]


def actual_hunks() -> list[Hunk]:
    """Where the scripts differ, as difflib aligns them (no context lines, no numbers, so a
    shared line edited alike in both moves nothing)."""
    dp = (ROOT / "train_dp.py").read_text().splitlines()
    ddp = (ROOT / "train_ddp.py").read_text().splitlines()
    matcher = difflib.SequenceMatcher(None, dp, ddp, autojunk=False)
    return [
        (tuple(dp[i1:i2]), tuple(ddp[j1:j2]))
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def known_hunks(text: str) -> list[tuple[str, Hunk]]:
    """The file's (reason, hunk) pairs. Lines before the first `##` are its preamble."""
    entries: list[tuple[str, list[str], list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            entries.append((line[3:], [], []))
        elif entries and line[:1] in "-+" and line:
            entries[-1][1 if line[0] == "-" else 2].append(line[1:])
        elif entries and line.strip():
            raise ValueError(f"{HUNKS.name}: not a hunk line: {line!r}")
    return [(why, (tuple(dp), tuple(ddp))) for why, dp, ddp in entries]


def render(hunk: Hunk, why: str) -> str:
    dp, ddp = hunk
    return "\n".join([f"## {why}", *(f"-{x}" for x in dp), *(f"+{x}" for x in ddp)])


def test_the_scripts_differ_only_in_the_known_hunks():
    known = known_hunks(HUNKS.read_text())
    assert all(why.strip() for why, _ in known), "every known hunk says why it exists"
    expected = [hunk for _, hunk in known]
    actual = actual_hunks()
    if actual != expected:
        new = [render(h, "NEW: why does this differ?") for h in actual if h not in expected]
        gone = [render(h, why) for why, h in known if h not in actual]
        raise AssertionError(
            "train_dp.py and train_ddp.py have drifted apart. Lines the scripts share must "
            "read the same in both; a lesson hunk that changes on purpose is updated in "
            f"{HUNKS.relative_to(ROOT)} (`python -m tests.test_scripts_pair` prints the current "
            "ones)."
            + ("\n\nHunks not in the file:\n" + "\n\n".join(new) if new else "")
            + ("\n\nHunks of the file no longer there:\n" + "\n\n".join(gone) if gone else "")
            + ("\n\n(same hunks, in another order)" if not new and not gone else "")
        )


def changed_lines() -> int:
    """docs/dp-vs-ddp.md's figure: GNU diff's changed lines, counted as its command counts
    them; where `diff` is missing, the same count over difflib's alignment."""
    if shutil.which("diff"):
        out = subprocess.run(
            ["diff", "-u", "train_dp.py", "train_ddp.py"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return sum(1 for line in out.splitlines()[2:] if CHANGED.match(line))  # not ---/+++
    lines = [f"-{x}" for dp, _ in actual_hunks() for x in dp]
    lines += [f"+{x}" for _, ddp in actual_hunks() for x in ddp]
    return sum(1 for line in lines if CHANGED.match(line))


def test_the_diff_stays_short():
    n = changed_lines()
    assert 0 < n <= MAX_CHANGED_LINES, (
        f"`diff -u train_dp.py train_ddp.py` has {n} changed lines, more than "
        f"{MAX_CHANGED_LINES}: what both scripts need belongs in training/, and what only "
        "train_ddp.py's extensions need enters through as few lines as possible"
    )


def lesson_positions(ddp_side: list[str]) -> list[int]:
    """Where each LESSON piece first appears among train_ddp.py's changed lines (-1: absent),
    searching on from the previous piece's line."""
    found, start = [], 0
    for _, piece in LESSON:
        at = next((i for i in range(start, len(ddp_side)) if piece in ddp_side[i]), -1)
        found.append(at)
        start = max(at, start)
    return found


def test_the_diff_shows_what_ddp_changes_in_reading_order():
    ddp_side = [line for _, ddp in actual_hunks() for line in ddp]
    missing = [
        what for (what, _), at in zip(LESSON, lesson_positions(ddp_side), strict=True) if at < 0
    ]
    assert not missing, f"the diff no longer shows, in this order: {missing}"


def test_the_order_check_can_fail():
    in_order = [piece for _, piece in LESSON]
    assert -1 not in lesson_positions(in_order)
    swapped = [in_order[1], in_order[0], *in_order[2:]]  # set_device before resolve
    assert lesson_positions(swapped)[1] == -1
    assert lesson_positions(in_order[:-1])[-1] == -1  # no_sync() gone


def test_known_hunks_parse_and_render_back():
    text = "preamble\n\n## a reason\n-old\n+new\n\n## another\n+only added\n"
    known = known_hunks(text)
    assert known == [("a reason", (("old",), ("new",))), ("another", ((), ("only added",)))]
    assert render(known[0][1], "a reason") == "## a reason\n-old\n+new"


def main() -> None:
    reasons = {hunk: why for why, hunk in known_hunks(HUNKS.read_text())}
    for hunk in actual_hunks():
        print(render(hunk, reasons.get(hunk, "NEW: why does this differ?")) + "\n")


if __name__ == "__main__":
    main()
