"""Datasets and sharding, checked without processes: the samplers are pure functions of
(rank, world size, seed, epoch), so the DDP data contract can be checked directly."""

import gzip
import io
import re
import struct
import zlib

import pytest
import torch
from PIL import Image

from core.errors import UsageError
from data.datasets import build_datasets, synthetic
from data.sampling import ResumableDistributedSampler, ShardSampler, eval_loader, train_loader
from tests.fake_datasets import write_cifar10, write_mnist


def test_synthetic_is_a_function_of_the_seed():
    a, b = synthetic(64, seed=3, split=0), synthetic(64, seed=3, split=0)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    other_split = synthetic(64, seed=3, split=1)
    assert not torch.equal(a.tensors[0], other_split.tensors[0])
    assert a.tensors[0].shape == (64, 3, 32, 32) and set(a.tensors[1].tolist()) <= set(range(10))


def _loader(data, batch: int, rank: int, world: int, seed: int, epoch: int | None = None):
    """The scripts' training loader: their DistributedSampler, set to `epoch` if given."""
    sampler = ResumableDistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    if epoch is not None:
        sampler.set_epoch(epoch)
    return train_loader(data, batch, sampler)


def _steps(world: int, batch: int, n: int, epoch: int, seed: int = 7) -> list[list[int]]:
    """The samples each optimizer step sees, as one list per step, over all ranks."""
    data = torch.utils.data.TensorDataset(torch.arange(n))
    per_rank = []
    for rank in range(world):
        loader = _loader(data, batch, rank, world, seed, epoch)
        per_rank.append([b[0].tolist() for b in loader])
    assert len({len(p) for p in per_rank}) == 1, "ranks must run the same number of steps"
    return [sorted(sum((p[i] for p in per_rank), [])) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_global_batches_equal_single_process_batches(world):
    # W ranks x batch B see, step by step, exactly the samples of one process with batch W*B:
    # the data half of the DDP == single-process oracle. 103 samples: nothing divides evenly.
    for epoch in (0, 1):
        assert _steps(world, 5, 103, epoch) == _steps(1, 5 * world, 103, epoch)
    assert _steps(world, 5, 103, 0) != _steps(world, 5, 103, 1), "set_epoch must reshuffle"


def test_resumed_sampler_skips_exactly_the_seen_samples():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    full = _loader(data, 4, rank=1, world=2, seed=0, epoch=2)
    seen = [b[0].tolist() for b in full]
    resumed = _loader(data, 4, rank=1, world=2, seed=0, epoch=2)
    resumed.sampler.start_at(2 * 4)
    assert [b[0].tolist() for b in resumed] == seen[2:]
    assert [b[0].tolist() for b in resumed] == seen, "the skip applies to one epoch only"


@pytest.mark.parametrize("n,world", [(10, 3), (7, 4), (2, 3), (12, 4)])
def test_eval_shards_cover_every_sample_once(n, world):
    shards = [list(ShardSampler(range(n), r, world)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    data = torch.utils.data.TensorDataset(torch.arange(n))
    seen = [
        x
        for r in range(world)
        for (b,) in eval_loader(data, 3, rank=r, world_size=world)
        for x in b.tolist()
    ]
    assert sorted(seen) == list(range(n))


def test_batch_that_does_not_fit_is_a_usage_error():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    with pytest.raises(UsageError, match=r"4 rank\(s\) = 12 samples per step.*only 10"):
        _loader(data, 3, rank=0, world=4, seed=0)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_formats_load_through_torchvision(tmp_path, name, folder):
    arrays = write_mnist(tmp_path, folder)
    spec = build_datasets(name, str(tmp_path), seed=0)
    assert (len(spec.train), len(spec.eval)) == (60, 25)
    assert (spec.in_channels, spec.image_size, spec.num_classes) == (1, 28, 10)
    image, label = spec.train[5]
    assert label == arrays["train_labels"][5]
    # ToTensor scales to [0, 1], then the dataset's mean/std normalisation is applied.
    raw = torch.from_numpy(arrays["train_images"][5]).float() / 255
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}[name]
    torch.testing.assert_close(image[0], (raw - mean) / std)
    assert len(build_datasets(name, str(tmp_path), seed=0, train_size=10).train) == 10


def test_cifar10_format_loads_through_torchvision(tmp_path):
    arrays = write_cifar10(tmp_path)
    spec = build_datasets("cifar10", str(tmp_path), seed=0, augment=True, trust_files=True)
    assert (len(spec.train), len(spec.eval)) == (60, 20)
    assert (spec.in_channels, spec.image_size) == (3, 32)
    image, label = spec.eval[3]
    assert label == arrays["test_labels"][3]
    raw = torch.from_numpy(arrays["test_data"][3].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(image[1], (raw[1] - 0.4822) / 0.2435)
    assert spec.train[0][0].shape == (3, 32, 32)  # random crop + flip keep the shape


def test_missing_or_malformed_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        build_datasets("mnist", str(tmp_path / "nowhere"), seed=0)
    # A folder without the data names the flag that fetches it (not torchvision's download=True).
    with pytest.raises(UsageError, match=r"cannot read mnist from .*Dataset not found") as info:
        build_datasets("mnist", str(tmp_path), seed=0)
    assert str(info.value).endswith("; add --download to fetch it"), info.value
    assert "download=True" not in str(info.value)
    with pytest.raises(UsageError, match=r"data_batch_1 is missing .*add --download to fetch"):
        build_datasets("cifar10", str(tmp_path), seed=0)
    with pytest.raises(UsageError, match="needs --data-dir"):
        build_datasets("cifar10", None, seed=0)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="data_batch_3: not a CIFAR-10 batch file"):
        build_datasets("cifar10", str(tmp_path), seed=0, trust_files=True)
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03\0")
    with pytest.raises(UsageError, match="cannot read mnist") as info:
        build_datasets("mnist", str(tmp_path), seed=0)
    assert "\n" not in str(info.value)


def _png_declaring(path, width: int, height: int) -> None:
    """A 1 x 1 PNG whose header says `width` x `height`: a bomb's size in a few bytes."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's fields, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _image_folders(root, n: int = 3):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                noise = Image.effect_noise((16, 16), 50).convert("RGB")
                noise.save(root / split / cls / f"{i}.png")
    return root


def _read_all(root) -> None:
    spec = build_datasets("imagefolder", str(root), seed=0)
    for i in range(len(spec.train)):
        spec.train[i]


@pytest.mark.parametrize("kind", ["bomb", "truncated", "other size", "symlink loop", "link loop"])
def test_a_bad_image_folder_is_one_line_before_anything_large_is_decoded(tmp_path, kind):
    root = _image_folders(tmp_path)
    later = root / "train" / "b" / "1.png"  # not the first image: found when it is loaded
    if kind == "bomb":
        _png_declaring(later, 12000, 12000)  # 1.7 GB as a float tensor, if decoded
        says = "12000 x 12000 pixels, more than the 16777216"
    elif kind == "truncated":
        later.write_bytes(later.read_bytes()[: later.stat().st_size // 2])
        says = "1.png: not a readable image (image file is truncated"
    elif kind == "other size":
        Image.new("RGB", (17, 16)).save(later)
        says = "17 x 16 pixels, the first image has 16 x 16"
    elif kind == "symlink loop":
        (root / "train" / "a" / "up").symlink_to("..")
        says = "again (a symlink loop"
    else:
        later.unlink()
        later.symlink_to("2.png")
        (root / "train" / "b" / "2.png").unlink()
        (root / "train" / "b" / "2.png").symlink_to("1.png")
        says = "Too many levels of symbolic links"
    with pytest.raises(UsageError, match=re.escape(says)) as info:
        _read_all(root)
    assert "\n" not in str(info.value)


def test_mnist_gz_files_alone_are_refused_with_the_way_to_read_them(tmp_path):
    write_mnist(tmp_path)
    for raw in (tmp_path / "MNIST" / "raw").iterdir():
        raw.with_name(raw.name + ".gz").write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    with pytest.raises(UsageError, match="holds .gz files: torchvision reads them unpacked"):
        build_datasets("mnist", str(tmp_path), seed=0)
