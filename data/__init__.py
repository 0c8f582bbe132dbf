"""Datasets (a synthetic default, torchvision ones read from --data-dir, text as bytes) and the
samplers that shard them across ranks."""

# --dataset's choices, here where the flags can read them without importing torch.
DATASETS = ("synthetic", "mnist", "fashion-mnist", "cifar10", "imagefolder")
TEXT_DATASETS = ("stdlib", "text")  # bytes for --model gpt: data/text.py
DATASETS += TEXT_DATASETS
