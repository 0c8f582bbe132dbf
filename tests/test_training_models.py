import copy
import json
import threading

import pytest
import torch
import torch.nn as nn

import train_ddp
from core.errors import UsageError
from data.datasets import DataSpec
from tests.multiproc import PYTHON, run_cmd
from training.models import MODELS, DataParallel, build_model, has_batchnorm, model_from_args


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_model_fits_every_dataset_shape(name, channels, size):
    model = build_model(name, channels, size, 10)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    # Only resnet18 has BatchNorm: the default models compute the same function whatever
    # the per-rank batch size, which the DDP == single-process oracle relies on.
    assert has_batchnorm(model) == (name == "resnet18")


def test_sync_bn_needs_a_batchnorm_layer_to_convert():
    data = DataSpec(train=None, eval=None, in_channels=3, image_size=32, num_classes=10)
    args = train_ddp.parse_args(["--model", "mlp", "--sync-bn"])
    with pytest.raises(UsageError, match="--sync-bn: model mlp has no BatchNorm layer"):
        model_from_args(args, data)
    args = train_ddp.parse_args(["--model", "resnet18", "--sync-bn"])
    assert has_batchnorm(model_from_args(args, data))


def test_bf16_autocast_and_loader_workers_train(tmp_path):
    s = train_ddp.main(
        [
            "--amp",
            "bf16",
            "--workers",
            "2",
            "--train-size",
            "256",
            "--eval-size",
            "50",
            "--batch-size",
            "32",
            "--max-steps",
            "4",
            "--model",
            "mlp",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert s["steps"] == 4 and s["eval_samples"] == 50
    assert 0 < s["final_train_loss"] < 10


# ---- DataParallel under autocast. The dtype chosen on the CPU here is float16, the one
# that is not CPU autocast's default (bfloat16): the same situation as --amp bf16 on CUDA,
# whose default is float16.


def _like_torchs_workers(replicas, inputs, kwargs_tup) -> list:
    """What torch's parallel_apply does with the replicas (torch/nn/parallel/
    parallel_apply.py, _worker): a thread each, in which autocast is entered again with
    `enabled` copied from the caller and no dtype. (torch's own needs a GPU to run.)"""
    enabled, results = torch.is_autocast_enabled("cpu"), {}

    def worker(i: int) -> None:
        with torch.amp.autocast("cpu", enabled=enabled):
            results[i] = replicas[i](*inputs[i], **kwargs_tup[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[i] for i in range(len(replicas))]


def test_dataparallel_replicas_compute_in_the_callers_autocast_dtype(monkeypatch):
    """The plain nn.DataParallel's replicas compute in the thread's default dtype (the bug,
    shown on CPU, so that this test can fail); training.models.DataParallel's in the dtype
    the caller chose, bit for bit what the caller's own thread computes."""
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    torchs = lambda self, *args: _like_torchs_workers(*args)  # noqa: E731
    monkeypatch.setattr(nn.DataParallel, "parallel_apply", torchs)
    outputs = {}
    for wrapper in (nn.DataParallel, DataParallel):
        dp = wrapper(layer)  # on a CPU-only host: no devices, the module as it is
        dp.src_device_obj = torch.device("cpu")  # as __init__ sets it on a GPU host
        # Copies, as DataParallel's replicas are: autocast caches a parameter's cast copy.
        replicas = [copy.deepcopy(layer) for _ in range(2)]
        with torch.autocast("cpu", dtype=torch.float16):
            want = layer(x)
            outputs[wrapper] = dp.parallel_apply(replicas, [(x,), (x,)], [{}, {}])
    assert want.dtype == torch.float16
    assert [y.dtype for y in outputs[nn.DataParallel]] == [torch.bfloat16] * 2  # torch's
    assert [y.dtype for y in outputs[DataParallel]] == [torch.float16] * 2
    assert all(torch.equal(y, want) for y in outputs[DataParallel])
    # Without autocast the replicas are passed on as they are.
    assert dp.parallel_apply([layer], [(x,)], [{}])[0].dtype == torch.float32


DP_BF16_PROBE = """
import json, torch, torch.nn as nn
from training.models import DataParallel
seen = []
layer = nn.Linear(64, 64).cuda()
layer.register_forward_hook(lambda m, i, out: seen.append((str(out.device), str(out.dtype))))
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = DataParallel(layer, device_ids=[0, 1])(torch.randn(8, 64, device="cuda"))
print(json.dumps(sorted(seen)))
"""


@pytest.mark.gpu(2)
def test_dataparallel_on_two_gpus_computes_in_bf16():
    """torch's own threads on 2 GPUs: every replica's output is bfloat16 (float16 with a
    plain nn.DataParallel)."""
    result = run_cmd([PYTHON, "-c", DP_BF16_PROBE], gpus=True, check=True, timeout=180)
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen == [["cuda:0", "torch.bfloat16"], ["cuda:1", "torch.bfloat16"]], seen
