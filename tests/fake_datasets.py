"""Tiny datasets written in the real on-disk formats that torchvision reads, so the real
loading code runs in tests without the internet: MNIST / Fashion-MNIST idx files and
CIFAR-10 python pickles."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    # idx format: two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, then each dimension as a big-endian int32, then the raw bytes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(
    root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 25, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"] = images, labels
    return arrays


def write_cifar10(
    root: Path, per_batch: int = 12, n_test: int = 20, seed: int = 0, protocol: int = 2
) -> dict[str, np.ndarray]:
    """CIFAR-10's python format; not the official bytes, so loading needs --trust-data-dir
    (`trust_files=True`). The official files are protocol-2 pickles (Python 2's cPickle)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, list] = {"train_data": [], "train_labels": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows of R, G, B planes
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=protocol)
        if name == "test_batch":
            arrays["test_data"], arrays["test_labels"] = data, labels
        else:
            arrays["train_data"].append(data)
            arrays["train_labels"].extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=protocol)
    arrays["train_data"] = np.concatenate(arrays["train_data"])
    return arrays
