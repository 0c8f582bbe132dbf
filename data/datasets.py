"""Image-classification datasets: a synthetic default that needs no files; MNIST,
Fashion-MNIST and CIFAR-10 read by torchvision from their standard on-disk formats; and any
folder of images sorted into one sub-folder per class (torchvision's ImageFolder).

What `--data-dir D` must hold (what `--download` writes for the torchvision ones):

    mnist          D/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte,
                   t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, uncompressed:
                   torchvision (0.29) reads no .gz; the official .gz files alone unpack
                   with --download, which checks their MD5 and then fetches nothing
    fashion-mnist  D/FashionMNIST/raw/ with the same four file names
    cifar10        D/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch,
                   batches.meta (the python version of the archive, unpacked)
    imagefolder    D/train/<class>/<image> and D/val/<class>/<image>: the same class folder
                   names in both, images of one size (png, jpg, ...; converted to RGB), at
                   most MAX_PIXELS pixels each

Dataset files are untrusted input, like checkpoints. CIFAR-10's are pickles, which can run
code when unpickled: each must match torchvision's MD5 sum of the official file, unless
--trust-data-dir says the folder is a copy the user vouches for, and either way it is read
by an unpickler that builds numpy arrays, lists and strings only. MNIST's idx files and
image folders are parsed, never unpickled. An image's size is read from its header before
it is decoded: a small PNG can declare 12000 x 12000 pixels (1.7 GB as a float tensor).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset, TensorDataset

from core.errors import UsageError
from core.processes import available_memory
from data import DATASETS, TEXT_DATASETS
from data.text import VOCAB, text_datasets

# Where torchvision looks inside --data-dir (the module docstring has the file names).
LAYOUT = {
    "mnist": "<data-dir>/MNIST/raw/*-ubyte",
    "fashion-mnist": "<data-dir>/FashionMNIST/raw/*-ubyte",
    "cifar10": "<data-dir>/cifar-10-batches-py/data_batch_1 ...",
}


@dataclass
class DataSpec:
    train: Dataset
    eval: Dataset
    in_channels: int
    image_size: int
    num_classes: int


def synthetic(
    n: int, seed: int, split: int, num_classes: int = 10, channels: int = 3, size: int = 32
) -> TensorDataset:
    """A learnable image-classification task made from a seed alone.

    Each class has a smooth random template (a coarse 4x4 pattern per channel, upsampled).
    A sample is its class template with random contrast and brightness plus heavy pixel
    noise, so a model has to average over many pixels to see the class: chance is 10%,
    the default CNN passes 90% within one epoch (about ten seconds on two CPU processes).

    The templates depend on `seed` only, so train and eval splits share them; the samples
    depend on (`seed`, `split`). Every rank that builds the dataset gets the same tensors,
    bit for bit, with no communication.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    g = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    labels = torch.randint(num_classes, (n,), generator=g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.2, generator=g)
    brightness = 0.5 * torch.randn(n, 1, 1, 1, generator=g)
    noise = 4.0 * torch.randn(n, channels, size, size, generator=g)
    images = contrast * templates[labels] + brightness + noise
    return TensorDataset(images, labels)


# Bytes of one synthetic sample: a 3 x 32 x 32 float32 image and an int64 label.
SYNTHETIC_SAMPLE_BYTES = 3 * 32 * 32 * 4 + 8


def _check_synthetic_memory(samples: int) -> None:
    """Refuse synthetic data the machine cannot hold: the allocation would fail with a
    traceback, or the kernel would kill the run with no line at all."""
    need = samples * SYNTHETIC_SAMPLE_BYTES * 2  # the samples, and the noise they are made of
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"--train-size/--eval-size: {samples} synthetic samples need about "
            f"{need / 1e9:.1f} GB of memory, this machine has {free / 1e9:.1f} GB available"
        )


def _torchvision(
    name: str, root: Path, train: bool, download: bool, augment: bool, trust_files: bool
) -> Dataset:
    from torchvision import datasets, transforms

    stats = {
        "mnist": ((0.1307,), (0.3081,)),
        "fashion-mnist": ((0.2860,), (0.3530,)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    }[name]
    steps = [transforms.ToTensor(), transforms.Normalize(*stats)]
    if augment and train and name == "cifar10":
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *steps]
    transform = transforms.Compose(steps)
    if name == "cifar10":
        return _cifar10_files(trust_files)(str(root), train, download, transform)
    # MNIST's idx files are raw bytes behind a small header, parsed without unpickling.
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    return cls(str(root), train=train, download=download, transform=transform)


# What a CIFAR batch pickle may name: numpy's array and dtype rebuilders (numpy 1 and 2
# spellings; `_frombuffer` is protocol 5's) and `_codecs.encode`, with which protocol 2
# stores bytes. Nothing else: a pickle that names os.system, eval or any other callable is
# refused before anything runs, whatever its checksum.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks to run {module}.{name}, refused")
        if module.startswith("numpy.core."):  # numpy 2 moved numpy.core to numpy._core
            module = module.replace("numpy.core.", "numpy._core.", 1)
            if not hasattr(np, "_core"):  # numpy 1
                module = module.replace("numpy._core.", "numpy.core.", 1)
        return getattr(importlib.import_module(module), name)


def load_cifar_pickle(path: Path) -> dict:
    """One CIFAR-10 python-format file (a pickled dict of numpy arrays, lists and strings),
    unpickled by an unpickler that can build nothing else: a tampered file cannot run code.
    Python 2 strings decode as latin-1, as torchvision reads them."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # refused, truncated, not a pickle at all
        raise UsageError(f"{path}: not a CIFAR-10 batch file ({e})") from None
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: not a CIFAR-10 batch file (holds a {type(entry).__name__})")
    return entry


def _check_batch(path: Path, entry: dict) -> tuple[np.ndarray, list[int]]:
    """The images and labels of one batch file, checked against the format before use: a
    malformed file fails here, in one line, not later in the middle of training."""
    name = str(path)
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise UsageError(f"{name}: not a CIFAR-10 batch file, 'data' is not a 2-d uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise UsageError(
            f"{name}: not a CIFAR-10 batch file, its 'data' rows hold {data.shape[1]} bytes, "
            "not 3x32x32"
        )
    if not isinstance(labels, list) or len(labels) != len(data):
        raise UsageError(
            f"{name}: not a CIFAR-10 batch file, 'labels' is not a list of {len(data)} labels"
        )
    if not all(type(y) is int and 0 <= y < 10 for y in labels):
        raise UsageError(
            f"{name}: not a CIFAR-10 batch file, 'labels' holds a value that is not a class 0..9"
        )
    return data, labels


def _cifar10_files(trust_files: bool) -> type:
    """Built on first use, so that importing this module does not import torchvision."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    class CIFAR10Files(datasets.CIFAR10):
        """torchvision's CIFAR-10, read more carefully. Every file is first checked against
        torchvision's MD5 sums of the official release (`trust_files` skips that, for a
        subset or a re-packed copy the user vouches for: --trust-data-dir), then unpickled
        by `load_cifar_pickle`, which builds arrays and nothing else, and checked against
        the format. `--download` fetches and verifies the official archive as usual."""

        def __init__(self, root: str, train: bool, download: bool, transform) -> None:
            datasets.VisionDataset.__init__(self, root, transform=transform)
            self.train = train
            if download:
                self.download()
            folder = Path(self.root) / self.base_folder
            files = self.train_list + self.test_list + [[self.meta["filename"], self.meta["md5"]]]
            for name, md5 in files:
                if not (folder / name).is_file():
                    raise UsageError(
                        f"{folder / name} is missing (expected: {LAYOUT['cifar10']}); "
                        "add --download to fetch it"
                    )
                if not trust_files and not check_integrity(str(folder / name), md5):
                    raise UsageError(
                        f"{folder / name} is not the official CIFAR-10 file (its MD5 differs "
                        "from torchvision's); for a subset or re-packed copy from a source you "
                        "trust, add --trust-data-dir"
                    )
            batches = [
                _check_batch(folder / name, load_cifar_pickle(folder / name))
                for name, _ in (self.train_list if train else self.test_list)
            ]
            self.data = np.vstack([d for d, _ in batches]).reshape(-1, 3, 32, 32)
            self.data = self.data.transpose((0, 2, 3, 1))  # HWC, as torchvision keeps it
            self.targets = [y for _, labels in batches for y in labels]
            self.classes = load_cifar_pickle(folder / self.meta["filename"])[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    return CIFAR10Files


def _check_labels(ds: Dataset, split: str, num_classes: int = 10) -> None:
    """Every label of a torchvision dataset, checked once at load (one small array): files
    with fewer labels than images, or a label outside the classes, pass the first-sample
    probe and would fail mid-training with an IndexError or a CUDA assertion."""
    try:
        labels = torch.as_tensor(ds.targets)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"the {split} labels are not a list of integers") from None
    n = len(ds.data)
    if labels.ndim != 1 or len(labels) != n or labels.is_floating_point():
        raise ValueError(f"the {split} split has {n} images but {len(labels)} labels")
    low, high = (int(labels.min()), int(labels.max())) if n else (0, 0)
    if low < 0 or high >= num_classes:
        found = low if low < 0 else high
        raise ValueError(f"a {split} label is {found}; labels are 0 to {num_classes - 1}")


# The most pixels an image-folder image may have (4096 x 4096; 200 MB as a float tensor,
# which this module makes of it without resizing). PIL's own bound (MAX_IMAGE_PIXELS, 89M)
# only warns below twice that.
MAX_PIXELS = 4096 * 4096


class DataFileError(UsageError):
    """A data file refused while a batch is loaded. A DataLoader worker re-raises its
    exception in the main process as `cls(message)` with the worker's traceback as the
    message: keep its last line's message, so the refusal stays one line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image's header, nothing decoded; a DataFileError if it is
    no image or has more than MAX_PIXELS pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns above its own bound: the line below says it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
    except Exception as e:  # noqa: BLE001 - not an image, unreadable, PIL's own bomb check
        raise DataFileError(f"{path}: not a readable image ({_one_line(e)})") from None
    if size[0] * size[1] > MAX_PIXELS:
        raise DataFileError(
            f"{path}: {size[0]} x {size[1]} pixels, more than the {MAX_PIXELS} an image may "
            "have here (resize the images first)"
        )
    return size


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


class _CheckedLoader:
    """ImageFolder's loader, checked: the header first (`_image_size`, and the size of the
    first image: batches stack images of one size), then the decode, whose errors (a
    truncated file) name the file in one line. A class, not a closure: DataLoader workers
    started by spawn receive it pickled."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        self.size = size

    def __call__(self, path: str):
        from PIL import Image

        size = _image_size(path)
        if size != self.size:
            raise DataFileError(
                f"{path}: {size[0]} x {size[1]} pixels, the first image has {self.size[0]} x "
                f"{self.size[1]}; an image folder needs images of one size"
            )
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as e:  # noqa: BLE001 - truncated, corrupt
            raise DataFileError(f"{path}: not a readable image ({_one_line(e)})") from None


def _limit(ds: Dataset, n: int) -> Dataset:
    return ds if n <= 0 or n >= len(ds) else Subset(ds, range(n))


def build_datasets(
    name: str,
    data_dir: str | None,
    *,
    seed: int,
    train_size: int = 0,
    eval_size: int = 0,
    download: bool = False,
    augment: bool = False,
    trust_files: bool = False,
    context: int = 128,
) -> DataSpec:
    """The train and eval splits of `name`. `train_size`/`eval_size` > 0 keep only the first
    N samples (for synthetic data, they set its size; for text, N windows spread over the
    split). `trust_files` (--trust-data-dir) loads CIFAR-10 files whose checksums are not the
    official ones (see `_cifar10_files`). `context` is the text datasets' window (--context)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name in TEXT_DATASETS:
        train, evals = text_datasets(
            name, data_dir, context=context, train_size=train_size, eval_size=eval_size
        )
        # For a model factory (--model module:function): one channel of `context` positions,
        # a class per byte value.
        return DataSpec(train, evals, in_channels=1, image_size=context, num_classes=VOCAB)
    if name == "synthetic":
        _check_synthetic_memory((train_size or 8192) + (eval_size or 2000))
        return DataSpec(
            synthetic(train_size or 8192, seed=seed, split=0),
            synthetic(eval_size or 2000, seed=seed, split=1),
            in_channels=3,
            image_size=32,
            num_classes=10,
        )
    if name == "imagefolder":
        return _image_folders(data_dir, train_size, eval_size)
    if not data_dir:
        raise UsageError(f"--dataset {name} needs --data-dir (add --download to fetch it)")
    root = Path(data_dir)
    if not root.is_dir() and not download:
        raise UsageError(f"--data-dir {root} does not exist (add --download to fetch {name})")
    try:
        train = _torchvision(name, root, True, download, augment, trust_files)
        evals = _torchvision(name, root, False, download, False, trust_files)
        image, _ = train[0]
        _check_labels(train, "training")
        _check_labels(evals, "test")
    except UsageError:  # already one line that names the file
        raise
    except Exception as e:  # torchvision says "not found", "corrupted", or fails to unpickle
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line
        # torchvision's hint names its own API ("You can use download=True ..."): ours instead
        msg = re.sub(r"\s*You can use download=True to download it\.?", "", msg)
        raw = root / LAYOUT[name].split("/")[1] / "raw"
        if "not found" in msg.lower() and any(raw.glob("*-ubyte.gz")):
            msg += (
                f" ({raw} holds .gz files: torchvision reads them unpacked; gunzip them, or "
                "add --download, which checks official ones and unpacks them offline)"
            )
        elif "not found" in msg.lower() and not download:
            msg += "; add --download to fetch it"
        raise UsageError(
            f"cannot read {name} from --data-dir {root} (expected: {LAYOUT[name]}): {msg}"
        ) from None
    return DataSpec(
        _limit(train, train_size),
        _limit(evals, eval_size),
        in_channels=image.shape[0],
        image_size=image.shape[-1],
        num_classes=10,
    )


def _image_folders(data_dir: str | None, train_size: int, eval_size: int) -> DataSpec:
    """`data_dir`/train and `data_dir`/val, each one sub-folder of images per class, read by
    torchvision's ImageFolder as tensors in [0, 1] (no normalisation, no resizing)."""
    from torchvision import datasets, transforms

    if not data_dir:
        raise UsageError("--dataset imagefolder needs --data-dir (with train/ and val/ inside)")
    root = Path(data_dir)
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise UsageError(
            f"--data-dir {root} has no {' or '.join(f'{m}/' for m in missing)} folder: "
            "--dataset imagefolder expects train/<class>/<image> and val/<class>/<image>"
        )
    try:
        train, evals = (
            datasets.ImageFolder(str(root / split), transform=transforms.ToTensor())
            for split in ("train", "val")
        )
        size = _image_size(train.samples[0][0]) if train.samples else None
        train.loader = evals.loader = _CheckedLoader(size)
        image, _ = train[0]
    except UsageError:  # already one line that names the file
        raise
    except Exception as e:  # no class folders, no image files
        raise UsageError(f"cannot read image folders from {root}: {_one_line(e)}") from None
    for ds, split in ((train, "train"), (evals, "val")):
        # ImageFolder follows symlinks to folders; one that points back up (a loop) repeats
        # the same files, down to the system's limit on nested links, as new samples.
        seen: dict[str, str] = {}
        for path, _ in ds.samples:
            first = seen.setdefault(os.path.realpath(path), path)
            if first != path:
                raise UsageError(
                    f"{root}/{split}: {path} is {first} again (a symlink loop, or a link to a "
                    "folder already read); each image must appear once"
                )
    if evals.classes != train.classes:
        raise UsageError(
            f"{root}/val has the classes {evals.classes}, {root}/train has {train.classes}: "
            "both need the same class folders"
        )
    return DataSpec(
        _limit(train, train_size),
        _limit(evals, eval_size),
        in_channels=image.shape[0],
        image_size=image.shape[-1],
        num_classes=len(train.classes),
    )


def download_once(name: str, data_dir: str | None, is_main: bool) -> None:
    """Fetch `name` into `data_dir` on global rank 0 while the other ranks wait, so that no
    two processes write the same files. A failure on rank 0 is raised on every rank (the
    others would otherwise wait for files that never come). Assumes all ranks see the same
    `data_dir`; without a shared filesystem, download on each node before launching."""
    error = None
    if is_main and name != "synthetic":
        try:
            build_datasets(name, data_dir, seed=0, download=True)
        except UsageError as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UsageError(error)
