"""Datasets (a synthetic default and torchvision ones read from --data-dir) and the
samplers that shard them across ranks."""

# --dataset's choices, here where the flags can read them without importing torch.
DATASETS = ("synthetic", "mnist", "fashion-mnist", "cifar10", "imagefolder")
