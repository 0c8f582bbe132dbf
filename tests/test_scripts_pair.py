"""train_dp.py and train_ddp.py differ only where DataParallel and DDP differ.

The two scripts are read side by side (`diff -u train_dp.py train_ddp.py`), so every line
they share must read the same in both. tests/pair_hunks.txt lists the hunks in which they
may differ, each under a `## why` line; this test fails when they differ anywhere else, or
differently there: a shared line edited in one script only, or a lesson hunk changed without
its entry. After a deliberate change, `python -m tests.test_scripts_pair` prints the hunks as they
are now, in the file's format, with the reasons of the hunks that have not changed.
"""

from __future__ import annotations

import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUNKS = Path(__file__).with_name("pair_hunks.txt")

Hunk = tuple[tuple[str, ...], tuple[str, ...]]  # train_dp.py's lines, train_ddp.py's lines


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
