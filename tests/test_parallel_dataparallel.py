"""The hand-made DataParallel computes what the plain module computes (outputs and the
gradients in the one set of parameters), really runs one replica per device in parallel
threads, and matches nn.DataParallel where there are GPUs to run it on."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel.dataparallel import ScratchDataParallel
from tests.multiproc import PYTHON, run_cmd
from training.models import build_model


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


@pytest.mark.oracle
def test_same_outputs_and_gradients_as_the_plain_module():
    x, y = batch(10)  # three CPU devices: chunks of 4, 4 and 2
    x = x.double()
    plain = cnn().double()
    dp = ScratchDataParallel(cnn().double(), ["cpu"] * 3)
    out_plain, grads_plain = loss_and_grads(plain, plain, x, y)
    out_dp, grads_dp = loss_and_grads(dp, dp.module, x, y)
    # Error model: one forward and backward in float64; the replicas see chunks of 4, 4 and
    # 2 samples instead of one batch of 10, and their gradients are summed chunk by chunk:
    # the same sums in another order, a few units of roundoff (u = 1.1e-16) relative to
    # outputs and gradients below 0.2, measured at most 5.6e-17 apart (ATEN_CPU_CAPABILITY
    # =default and avx2; 6e-8 in float32). A max-pool/ReLU tie decided the other way would
    # need two values within ~1e-15 of each other. 1e-12 is 10^4 above the rounding; a
    # replica's gradient left out changes them by 0.15 (checked below).
    torch.testing.assert_close(out_dp, out_plain, rtol=0, atol=1e-12)
    for a, b in zip(grads_dp, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
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


@pytest.mark.oracle
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
    # Closed form: sums of small integers are exact in float32, in any order.
    assert torch.equal(probe.weight.grad, torch.arange(21.0).reshape(7, 3).sum(0))

    # A failing replica fails the call, in the caller's thread.
    Probe.seen, Probe.barrier, Probe.fail_on = [], threading.Barrier(2), 2
    with pytest.raises(ValueError, match="chunk of 2"):
        ScratchDataParallel(Probe(), ["cpu"] * 2)(torch.zeros(5, 3))


@pytest.mark.gpu(2)
def test_matches_nn_dataparallel_on_two_gpus():
    """In a child that sees the GPUs (TF32 off): this process sees none. Both run the same
    kernels on the same chunks (5 samples per GPU); they differ at most in the order in which
    the two replicas' gradients are summed on cuda:0, one float32 rounding, within
    assert_close's float32 defaults."""
    code = "from tests.test_parallel_dataparallel import _matches_nn_dataparallel as f; f()"
    run_cmd([PYTHON, "-c", code], gpus=True, check=True, timeout=180)


def _matches_nn_dataparallel() -> None:
    x, y = batch(10)
    x, y = x.cuda(0), y.cuda(0)
    reference = nn.DataParallel(cnn().cuda(0), device_ids=[0, 1])
    scratch = ScratchDataParallel(cnn().cuda(0), ["cuda:0", "cuda:1"])
    out_ref, grads_ref = loss_and_grads(reference, reference.module, x, y)
    out_dp, grads_dp = loss_and_grads(scratch, scratch.module, x, y)
    torch.testing.assert_close(out_dp, out_ref)
    for a, b in zip(grads_dp, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
