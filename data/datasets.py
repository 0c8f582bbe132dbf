"""Image-classification datasets: a synthetic default that needs no files; MNIST,
Fashion-MNIST and CIFAR-10 read by torchvision from their standard on-disk formats; and any
folder of images sorted into one sub-folder per class (torchvision's ImageFolder).

What `--data-dir D` must hold (what `--download` writes for the torchvision ones):

    mnist          D/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte,
                   t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or the same names + .gz)
    fashion-mnist  D/FashionMNIST/raw/ with the same four file names
    cifar10        D/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch,
                   batches.meta (the python version of the archive, unpacked)
    imagefolder    D/train/<class>/<image> and D/val/<class>/<image>: the same class folder
                   names in both, images of one size (png, jpg, ...; converted to RGB)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset, TensorDataset

from comm.dist import UsageError

DATASETS = ("synthetic", "mnist", "fashion-mnist", "cifar10", "imagefolder")

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


def _torchvision(name: str, root: Path, train: bool, download: bool, augment: bool) -> Dataset:
    from torchvision import datasets, transforms

    stats = {
        "mnist": ((0.1307,), (0.3081,)),
        "fashion-mnist": ((0.2860,), (0.3530,)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    }[name]
    steps = [transforms.ToTensor(), transforms.Normalize(*stats)]
    if augment and train and name == "cifar10":
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *steps]
    if name == "cifar10":
        cls = _cifar10_files()
    else:
        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    return cls(str(root), train=train, download=download, transform=transforms.Compose(steps))


def _cifar10_files() -> type:
    """Built on first use, so that importing this module does not import torchvision."""
    from torchvision import datasets

    class CIFAR10Files(datasets.CIFAR10):
        """torchvision's CIFAR-10 reader, checking that the batch files exist rather than
        that they are byte-for-byte the official release (its MD5 sums). A subset or a
        re-packed copy in the same pickle format loads too; a damaged file still fails, when
        it is unpickled. `--download` fetches and verifies the official archive as usual."""

        train_list = [[f, None] for f, _ in datasets.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

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
) -> DataSpec:
    """The train and eval splits of `name`. `train_size`/`eval_size` > 0 keep only the first
    N samples (for synthetic data, they set its size)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
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
        train = _torchvision(name, root, True, download, augment)
        evals = _torchvision(name, root, False, download, False)
        image, _ = train[0]
        _check_labels(train, "training")
        _check_labels(evals, "test")
    except Exception as e:  # torchvision says "not found", "corrupted", or fails to unpickle
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line
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
        image, _ = train[0]
    except Exception as e:  # no class folders, no image files, an unreadable image
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(f"cannot read image folders from {root}: {msg}") from None
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
