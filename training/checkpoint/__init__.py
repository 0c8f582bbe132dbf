"""Checkpoints that any wrapper can load and that resume the exact same run, in three parts:

- contents.py: what a checkpoint holds (plain model keys whatever the wrapper, optimizer,
  scheduler, RNG states, counters) and how it goes back into live objects, all or nothing;
- files.py: how a file is written safely (temp file, fsync, rename) and read back checked
  (CRC-32 of every entry, `weights_only=True`: a checkpoint is untrusted input);
- resume.py: how a run resumes (`CheckpointManager`: rotation, the `checkpoint.pt` pointer,
  every rank's own part, which files a run may continue from, the ranks' agreement).

The names below are the ones the scripts and tests use; each is defined once, in its module.
"""

from training.checkpoint.contents import (
    CheckpointError,
    load_model_state,
    model_state,
    param_checksum,
    restore_training_state,
    rng_state,
    set_rng_state,
    training_state,
    unwrap,
)
from training.checkpoint.files import atomic_write, load_checkpoint, point, write_checkpoint
from training.checkpoint.resume import CheckpointManager, Position, check_resumable

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Position",
    "atomic_write",
    "check_resumable",
    "load_checkpoint",
    "load_model_state",
    "model_state",
    "param_checksum",
    "point",
    "restore_training_state",
    "rng_state",
    "set_rng_state",
    "training_state",
    "unwrap",
    "write_checkpoint",
]
