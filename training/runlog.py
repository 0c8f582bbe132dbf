"""What a run reports: log lines, TensorBoard scalars, a progress bar and summary.json.
All of it on global rank 0 only; on other ranks every method is a no-op."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from comm.dist import DistEnv, rank0_logger
from training.checkpoint.files import atomic_write


class RunLog:
    def __init__(self, env: DistEnv, out_dir: Path) -> None:
        self.enabled = env.is_main
        self.out_dir = Path(out_dir)
        self.log: logging.Logger = rank0_logger(env)
        self._tb = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def info(self, msg: str, *args) -> None:
        self.log.info(msg, *args)

    def scalars(self, step: int, **values: float) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)

    def progress(self, total: int, desc: str) -> tqdm:
        """A progress bar for people watching a terminal; silent in logs and CI (not a TTY)."""
        return tqdm(
            total=total,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            disable=not (self.enabled and sys.stderr.isatty()),
        )

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
            atomic_write(self.out_dir / "summary.json", text.encode())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
