"""Run a command under a pseudo-terminal and read back the screen a person would see."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def run_in_pty(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float, cols: int = 120
) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on one pseudo-terminal of `cols` columns, as
    in a terminal window; return its exit status and everything it wrote (raw bytes, decoded).
    Killed, with its process group, after `timeout` seconds."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its controlling tty and its stdio
        os.chdir(cwd)
        os.execve(argv[0], list(argv), dict(env))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                raise AssertionError(f"{' '.join(argv)} did not finish within {timeout}s")
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def screen(raw: str) -> list[str]:
    """What the terminal shows after `raw`: carriage returns move to column 0 and later
    characters overwrite earlier ones, line feeds move down, and the cursor movements tqdm
    uses (ESC[nA up, ESC[nB down, ESC[K erase to end of line) are applied. The lines, with
    trailing blanks stripped (an erased bar leaves spaces), empty ones dropped."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(raw):
        m = ESCAPE.match(raw, i)
        if m:
            n = int(m.group(1) or 1)
            if m.group(2) == "A":
                row = max(0, row - n)
            elif m.group(2) == "B":
                row += n
                while len(lines) <= row:
                    lines.append([])
            elif m.group(2) == "K":
                del lines[row][col:]
            i = m.end()
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1) if col >= len(line) else "")
            line[col] = ch
            col += 1
    text = ["".join(line).rstrip() for line in lines]
    return [line for line in text if line]
