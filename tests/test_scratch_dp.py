"""The hand-made DataParallel computes what the plain module computes (outputs and the
gradients in the one set of parameters), really runs one replica per device in parallel
threads, and matches nn.DataParallel where there are GPUs to run it on."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models import build_model
from training.scratch_dp import ScratchDataParallel


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 3, 32, 10)


def batch(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g)


def loss_and_grads(model: nn.Module, params: nn.Module, x, y):
    params.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out, [p.grad.clone() for p in params.parameters()]


def test_same_outputs_and_gradients_as_the_plain_module():
    x, y = batch(10)  # three CPU devices: chunks of 4, 4 and 2
    plain = cnn()
    dp = ScratchDataParallel(cnn(), ["cpu"] * 3)
    out_plain, grads_plain = loss_and_grads(plain, plain, x, y)
    out_dp, grads_dp = loss_and_grads(dp, dp.module, x, y)
    torch.testing.assert_close(out_dp, out_plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_dp, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Every replica contributed: one chunk's gradient alone is far from the whole batch's.
    _, grads_part = loss_and_grads(plain, plain, x[:4], y[:4])
    assert not torch.allclose(grads_part[-2], grads_plain[-2], rtol=1e-2, atol=1e-4)

    with torch.no_grad():  # grad mode reaches the replicas' threads too
        assert not dp(x).requires_grad


class Probe(nn.Module):
    """Records, for each replica, what it saw; the barrier makes a sequential run fail."""

    seen: list = []
    barrier: threading.Barrier | None = None
    fail_on = -1

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Probe.seen.append((x.shape[0], threading.get_ident(), self.weight))
        Probe.barrier.wait(timeout=20)  # all replicas must be running at the same time
        if x.shape[0] == Probe.fail_on:
            raise ValueError(f"chunk of {x.shape[0]}")
        return x * self.weight


def test_replicas_run_in_parallel_threads_and_copy_the_parameters():
    probe = Probe()
    dp = ScratchDataParallel(probe, ["cpu"] * 3)
    Probe.seen, Probe.barrier = [], threading.Barrier(3)
    out = dp(torch.arange(21.0).reshape(7, 3))
    out.sum().backward()

    assert sorted(n for n, _, _ in Probe.seen) == [1, 3, 3]  # torch.chunk's split of 7
    assert threading.get_ident() not in {ident for _, ident, _ in Probe.seen}
    weights = [w for _, _, w in Probe.seen]
    assert sum(w is probe.weight for w in weights) == 1  # the first device shares it
    assert all(w.grad_fn is not None for w in weights if w is not probe.weight)  # copies
    torch.testing.assert_close(probe.weight.grad, torch.arange(21.0).reshape(7, 3).sum(0))

    # A failing replica fails the call, in the caller's thread.
    Probe.seen, Probe.barrier, Probe.fail_on = [], threading.Barrier(2), 2
    with pytest.raises(ValueError, match="chunk of 2"):
        ScratchDataParallel(Probe(), ["cpu"] * 2)(torch.zeros(5, 3))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_matches_nn_dataparallel_on_two_gpus():
    x, y = batch(10)
    x, y = x.cuda(0), y.cuda(0)
    reference = nn.DataParallel(cnn().cuda(0), device_ids=[0, 1])
    scratch = ScratchDataParallel(cnn().cuda(0), ["cuda:0", "cuda:1"])
    out_ref, grads_ref = loss_and_grads(reference, reference.module, x, y)
    out_dp, grads_dp = loss_and_grads(scratch, scratch.module, x, y)
    torch.testing.assert_close(out_dp, out_ref)
    for a, b in zip(grads_dp, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
