"""The shell commands written in README.md, docs/*.md and pitfalls/README.md, as a reader
would copy them: lines of fenced or indented code blocks, and inline `code` that is a whole
command; "\\" continuations joined, "$ " prompts and trailing "# comments" removed."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")),
         "pitfalls/README.md"]  # fmt: skip
# A command starts with optional VAR=value assignments, then one of these programs.
PROGRAM = re.compile(
    r"^(?:[A-Z][A-Z0-9_]*=\S*\s+)*"
    r"(python|torchrun|make|launch/\S+|sbatch|source|tensorboard|diff|\.venv/bin/python)\b"
)
PLACEHOLDER = re.compile(r"\.\.\.|<|\[|\||^[A-Z]+$")  # `cmd [--only NAME]`, `torchrun ...`


def _strip_comment(line: str) -> str:
    """Drop a trailing `# comment` (a `#` that starts a shell word)."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
    except ValueError:
        return line.strip()
    cut = re.search(r"(^|\s)#", line)
    return line[: cut.start()].strip() if cut and len(words) < len(line.split()) else line.strip()


def _block_commands(lines: list[str]) -> list[str]:
    found, pending = [], ""
    for raw in lines:
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if pending:
            line = pending + " " + line
            pending = ""
        if not PROGRAM.match(line):
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        found.append(_strip_comment(line))
    return found


def commands(page: str) -> list[str]:
    """Every command on `page`, in page order, each once."""
    lines = (ROOT / page).read_text().splitlines()
    found: list[str] = []
    block: list[str] = []
    fenced, language = False, ""
    previous_blank = True
    for line in lines:
        if line.startswith("```"):
            if fenced:
                if language in ("", "bash", "sh", "shell", "console"):
                    found += _block_commands(block)
                block, fenced = [], False
            else:
                fenced, language, block = True, line[3:].strip(), []
            continue
        if fenced or line.startswith("    ") and (previous_blank or block):
            block.append(line)
        else:
            if block:
                found += _block_commands(block)
                block = []
            for span in re.findall(r"`([^`]+)`", line):
                whole = PROGRAM.match(span) and " " in span
                if whole and not any(PLACEHOLDER.search(word) for word in span.split()):
                    found.append(span)
        previous_blank = not line.strip()
    if block:
        found += _block_commands(block)
    return list(dict.fromkeys(found))


def all_commands() -> list[tuple[str, str]]:
    """(page, command) for every page, a command listed under the first page it is on."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for cmd in commands(page):
            seen.setdefault(cmd, page)
    return [(page, cmd) for cmd, page in seen.items()]


# What starts a training run, and the script whose --out-dir default it falls back on: the
# launchers pass their arguments on to train_ddp.py.
RUNS_OF = [
    (re.compile(r"(^|[\s/])train_dp\.py\b"), "train_dp.py"),
    (re.compile(r"(^|[\s/])train_ddp\.py\b|launch/\S+\.(sh|sbatch)|launch/spawn\.py"),
     "train_ddp.py"),
]  # fmt: skip


def default_out_dir(script: str) -> str:
    """The --out-dir `script` writes into when none is given, as its source sets it."""
    found = re.search(r'default_out_dir="([^"]+)"', (ROOT / script).read_text())
    assert found, f"{script}: no default_out_dir"
    return found.group(1)


def _recipe(cmd: str) -> list[str]:
    """The shell lines `make` would run for `cmd` (make -n -B: every prerequisite too)."""
    words = shlex.split(cmd)
    done = subprocess.run(
        ["make", "-n", "-B", *words[1:]], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.replace("\\\n", " ").splitlines()


def runs(cmd: str) -> list[tuple[str, bool]]:
    """Every training run `cmd` starts, in order: its --out-dir (the last --out-dir flag, else
    the script's default) and whether it replaces what is there (--overwrite). A make
    target: the runs of its recipe. `--help`, `diff`: none."""
    if cmd.startswith("make "):
        return [run for line in _recipe(cmd) for run in runs(line)]
    found = []
    for part in re.split(r"\s(?:;|&&|\|\||&)\s", cmd):  # make's recipes chain commands
        program = re.sub(r"^(?:[A-Z][A-Z0-9_]*=\S*\s+)*", "", part.strip()).split(" ")[0]
        script = next((s for pattern, s in RUNS_OF if pattern.search(part)), None)
        words = part.replace("--out-dir=", "--out-dir ").split()
        if script is None or program == "diff" or "--help" in words:
            continue
        given = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out-dir"]
        found.append((given[-1] if given else default_out_dir(script), "--overwrite" in words))
    return found
