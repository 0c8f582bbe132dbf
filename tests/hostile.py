"""Hostile copies of a sharded checkpoint folder (training/sharded.py), as an attacker makes
them: a payload in one file, then the sha256 list of train_state.pt refreshed ("re-signed"),
since whoever writes the folder writes that list too.

The payload opens a marker file for writing (creating it): `payload_runs(kind, good, marker)`
shows that a plain unpickler (the one torch's own DCP reader uses) runs it, so a test that
sees no marker after our reader refused the folder has proved the payload inert, not absent.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

STATE = "train_state.pt"
# What the payload sits in: .metadata, a tensor item or a non-tensor (bytes) item of a
# .distcp shard, train_state.pt.
KINDS = ("metadata", "tensor item", "bytes item", "train state")


class Payload:
    """Unpickled by a full unpickler, creates `marker` (builtins open, mode "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sign(folder: Path) -> None:
    """Refresh train_state.pt's sha256 list over the folder's files, as save_training does."""
    state = torch.load(folder / STATE, weights_only=True)
    state["files"] = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.name != STATE
    }
    torch.save(state, folder / STATE)


def _payload_bytes(marker: Path) -> bytes:
    """The payload as DCP stores an item: a torch.save archive."""
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def make_hostile(kind: str, good: Path, bad: Path, marker: Path) -> None:
    """`bad`: a copy of the checkpoint folder `good` with the payload in the file `kind` names,
    re-signed."""
    shutil.copytree(good, bad)
    if kind == "train state":
        state = torch.load(bad / STATE, weights_only=True)
        state["note"] = Payload(marker)
        torch.save(state, bad / STATE)
        return
    with open(bad / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own, trusted copy
    if kind == "metadata":
        metadata.__dict__["note"] = Payload(marker)
    else:
        # The first tensor's data now points at the payload, appended to its shard file.
        fqn = next(
            k
            for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, dcp_metadata.TensorStorageMetadata)
        )
        index = next(i for i in metadata.storage_data if i.fqn == fqn)
        info = metadata.storage_data.pop(index)
        shard = bad / info.relative_path
        offset = shard.stat().st_size
        data = _payload_bytes(marker)
        with open(shard, "ab") as f:
            f.write(data)
        if kind == "bytes item":
            metadata.state_dict_metadata[fqn] = dcp_metadata.BytesStorageMetadata()
            index = dcp_metadata.MetadataIndex(fqn)
        metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, len(data))
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    _sign(bad)


def payload_runs(kind: str, bad: Path, marker: Path) -> bool:
    """Load the hostile file of `bad` as torch's reader would (a plain unpickler, or torch.load
    with weights_only=False): does the marker appear? Removes it again."""
    marker.unlink(missing_ok=True)
    if kind == "metadata":
        pickle.loads((bad / ".metadata").read_bytes())
    elif kind == "train state":
        torch.load(bad / STATE, weights_only=False)
    else:
        with open(bad / ".metadata", "rb") as f:
            metadata = pickle.load(f)
        for info in metadata.storage_data.values():  # the last item of each shard file
            if info.offset + info.length == (bad / info.relative_path).stat().st_size:
                with open(bad / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran
