"""The figures the pages quote are what the code prints now (tests/doc_figures.py): a count,
a hash or a result line that can be recomputed in seconds is never typed by hand, and a
change to the code that changes one fails here until `make docs` has rewritten it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import doc_figures
from tests.doc_figures import FIGURES, PRINTED_BY, figure, quoted


def test_every_quoted_figure_is_what_the_code_prints_now() -> None:
    found = quoted()
    assert {name for _, name, _ in found} == set(FIGURES)  # each one quoted, none unknown
    assert set(PRINTED_BY) <= set(FIGURES)
    stale = [
        f"{page}: {name}: quoted {text!r}, now {figure(name)!r}"
        for page, name, text in found
        if text != figure(name)
    ]
    assert not stale, "stale figures (`make docs` rewrites them):\n" + "\n".join(stale)


def test_the_pair_counts_are_the_diff_of_the_scripts() -> None:
    """The counts are the page's commands, not a model of them: the diff has changed lines
    and hunks, and at least one changed line per hunk."""
    lines, hunks = int(figure("pair-diff-lines")), int(figure("pair-diff-hunks"))
    assert 1 <= hunks <= lines


def test_write_puts_back_a_figure_typed_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--write replaces what is between the markers and nothing else, and then has nothing
    left to change."""
    page = "pitfalls/README.md"
    (tmp_path / "pitfalls").mkdir()
    shutil.copy(doc_figures.ROOT / page, tmp_path / page)
    right = (tmp_path / page).read_text()
    hashes = figure("set-epoch-results").split("orders=")[-1].strip()
    assert hashes in right
    (tmp_path / page).write_text(right.replace(hashes, "525e54c7eb46,0daab6b3b5c3,7f0efe026d72"))
    monkeypatch.setattr(doc_figures, "ROOT", tmp_path)
    assert doc_figures.rewrite(page)
    assert (tmp_path / page).read_text() == right
    assert not doc_figures.rewrite(page)
