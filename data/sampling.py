"""Sharding a dataset across ranks.

Training uses torch's `DistributedSampler` (the scripts make it, and hand it to
`train_loader`): every rank draws the same permutation (from `seed` + epoch, hence
`sampler.set_epoch` every epoch) and takes every W-th index of it, so the W
per-rank batches of one step together are one contiguous slice of that permutation, exactly
the batch a single process would draw with a W times larger batch size. That is what makes
DDP on W ranks equal to one process, step for step.

Evaluation must count every sample once. `DistributedSampler` pads the eval set to a
multiple of W by repeating samples (so a metric counts some twice); `ShardSampler` gives the
ranks uneven shards instead, and the metrics are summed across ranks with all_reduce.
"""

from __future__ import annotations

import gc
import multiprocessing.context
import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from core.errors import UsageError


class ResumableDistributedSampler(DistributedSampler):
    """`DistributedSampler` that can start part-way into an epoch, so that a job resumed from
    a mid-epoch checkpoint sees exactly the samples it had not seen yet, in the same order.
    `start_at(k)` skips this rank's first k samples of the next epoch only.

    It also owns its DataLoader's `generator` (worker seeds, so random augmentation in the
    workers) and reseeds it from (seed, rank, epoch) in `set_epoch`, so an epoch's randomness
    does not depend on how many epochs this process ran before it: a resumed job gets the
    same numbers as an uninterrupted one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0
        self.generator = torch.Generator()  # for the DataLoader: see train_loader

    def start_at(self, samples: int) -> None:
        self._skip = samples

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch: without it every epoch replays the same order."""
        if epoch != self.epoch:
            self._skip = 0
        super().set_epoch(epoch)
        self.generator.manual_seed(self.seed + self.rank + 1_000_003 * epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self._skip :]
        self._skip = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self._skip


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, rank + 2W, ... in order: no padding, no drops, so the shards
    cover the dataset exactly once and may differ in length by one."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def outlive_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the signals that stop a run cleanly (training/preempt.py)
    must not kill the rank's loader workers, which would fail the rank at its next batch
    ("DataLoader worker ... is killed by signal: Terminated"). They do reach them: torchrun
    signals each rank's whole process group, SLURM every process of the job. torch's own
    SIGTERM handler in a worker ends it quietly when the rank sent the signal (the loader
    stopping a stuck worker) and dies of it otherwise; here, the signal is blocked and one
    thread takes it with its sender: from the rank it ends the worker as torch's handler
    would, from anyone else it is dropped. SIGUSR1/2 are ignored. (Needs sigwaitinfo: not
    on macOS, where the workers keep torch's behaviour.)"""
    if not hasattr(signal, "sigwaitinfo"):
        return
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    rank = os.getppid()
    # Blocked in this thread before any other starts, so in every thread of the worker.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == rank:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm-from-rank", daemon=True).start()


class _ForkWithoutGarbage(multiprocessing.context.ForkProcess):
    """A forked loader worker that cannot run a destructor of its rank's garbage.

    A forked child inherits every Python object of the rank but none of its threads. A
    process group that is no longer used but still held in a reference cycle (a quorum's
    old group, a run that ended in the same process) is freed by the first garbage
    collection that finds it, and in the child that collection runs its C++ destructor:
    ProcessGroupGloo's wakes worker threads that do not exist there, and the worker hangs
    (the loader, and the rank, wait on it forever) or aborts. So the rank collects its
    garbage first, while its threads are alive, and the worker is forked with every object
    in the collector's permanent generation (`gc.freeze`), which no collection in the child
    visits; the rank then takes its objects back (`gc.unfreeze`)."""

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        try:
            super().start()
        finally:
            gc.unfreeze()


class _ForkWithoutGarbageContext(multiprocessing.context.ForkContext):
    Process = _ForkWithoutGarbage


def _loader_kwargs(workers: int, pin_memory: bool) -> dict:
    kwargs: dict = {"num_workers": workers, "pin_memory": pin_memory}
    if workers > 0:
        # Workers are started once and kept across epochs. The datasets here are picklable,
        # so this also works under the spawn start method (macOS, Windows).
        kwargs["persistent_workers"] = True
        kwargs["worker_init_fn"] = outlive_stop_signals
        if torch.multiprocessing.get_start_method() == "fork":  # Linux before Python 3.14
            kwargs["multiprocessing_context"] = _ForkWithoutGarbageContext()
    return kwargs


def train_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: ResumableDistributedSampler,
    *,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of `batch_size` from this rank's shard; every optimizer step sees exactly
    `num_replicas * batch_size` samples (the last, incomplete global batch is dropped)."""
    global_batch = batch_size * sampler.num_replicas
    if len(dataset) < global_batch:
        raise UsageError(
            f"batch size {batch_size} per rank x {sampler.num_replicas} rank(s) = "
            f"{global_batch} samples per step, but the training set has only {len(dataset)}"
        )
    # drop_last=True here and in the sampler (the scripts make it with drop_last=True): the
    # sampler trims the epoch to a multiple of the world size, the loader drops the
    # incomplete batch, so all ranks run the same number of steps.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=sampler.generator,  # seeded per epoch by sampler.set_epoch()
        **_loader_kwargs(workers, pin_memory),
    )


def eval_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset, rank, world_size),
        **_loader_kwargs(workers, pin_memory),
    )
