"""The bug as it is usually written: DataLoader workers started at the top level of a script,
with no `if __name__ == "__main__":` guard.

    python pitfalls/unguarded_loader.py     # fails: see pitfalls/dataloader_spawn.py

Under the spawn start method (the default on macOS and Windows, and what this file asks for
explicitly so that it fails the same way on Linux) a worker process is a fresh interpreter
that imports this file to find the dataset. Importing it runs the top level again, which
builds a loader and starts a worker of its own from inside a process that is still starting
up. multiprocessing refuses, the worker dies, and the loader in the parent reports it.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

dataset = TensorDataset(torch.arange(8.0))
loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
print("sum", sum(batch.sum().item() for (batch,) in loader))
