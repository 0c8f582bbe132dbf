import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the work done inside the pytest process. The tests' ranks
    share two cores with it; several OpenMP threads fighting over them run up to ten times
    slower than one. It also keeps in-process runs bit-comparable with the ranks, which
    use one thread each (float sums depend on how work is split between threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
