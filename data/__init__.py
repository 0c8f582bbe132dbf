"""Datasets (a synthetic default and torchvision ones read from --data-dir) and the
samplers that shard them across ranks."""
