"""Loader workers forked from a rank that holds a dead process group as garbage.

The rank's objects are all inherited by a forked worker, its threads are not. A gloo group
that is no longer used but still held in a reference cycle (a fault-tolerant replica's old
quorum group, or an earlier run in the same process, as in the tests that call
`train_ddp.main` in-process) is destroyed by the first garbage collection that finds it. In
a worker that collection runs ProcessGroupGloo's destructor, which waits for worker threads
that the fork did not copy: the worker hangs, and the rank with it (CI hung an hour this way
in tests/test_inputs_fuzz.py), or it aborts. data/sampling.py forks the workers with the
rank's garbage collected and its objects frozen. Without that, a worker here hangs until the
deadline (a group left live in the cycle) or aborts (a destroyed one), and the test fails."""

from tests.multiproc import PYTHON, run_cmd

SCRIPT = """
import gc
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from data.sampling import ResumableDistributedSampler, train_loader

class Collecting(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        gc.collect()  # what any allocation in a worker may set off
        return torch.tensor(i)

live = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)  # never destroyed
live.allreduce([torch.ones(1)]).wait()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
destroyed = dist.new_group([0])
cycle = {"groups": [live, destroyed]}
cycle["self"] = cycle
del live, destroyed
dist.destroy_process_group()
del cycle
gc.disable()  # so that only a worker's collection can find the cycle
data = Collecting()
sampler = ResumableDistributedSampler(data, num_replicas=1, rank=0, shuffle=False)
loader = train_loader(data, 2, sampler, workers=2)
for epoch in range(2):
    print(sum(int(batch.sum()) for batch in loader))
"""


def test_a_worker_never_destroys_the_ranks_garbage_groups():
    # 60 s: the run takes about 3 s (torch's import and two worker starts); a hang is forever.
    done = run_cmd([PYTHON, "-c", SCRIPT], timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["28", "28"], done.stdout
