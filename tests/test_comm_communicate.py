"""communicate(): every rank ends with the closed-form result in the very tensors it passed.

Rank r contributes (r + 1) x pattern, where pattern numbers the elements 1, 2, 3, ... so a
piece copied back to the wrong place or in the wrong order shows; the all-reduced sum is
W(W + 1)/2 x pattern. The 4-rank world of tests.comm_world checks groups of 2, 3 and 4
ranks (the first n global ranks, whose group ranks equal their global ranks).
"""

import functools

import pytest
import torch
import torch.distributed as dist

from comm.communicate import (
    BucketViews,
    communicate,
    communicate_async,
    flatten,
    plan_buckets,
    plan_buckets_like_ddp,
    unflatten,
)
from tests import comm_world


def pattern(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float64) % 29 + 1).reshape(shape).to(dtype)


def contribution(rank: int) -> dict:
    """Fresh tensors of mixed shapes, dtypes and layouts, each (rank + 1) x its pattern."""
    k = rank + 1
    base = torch.zeros(6, 5)  # non-contiguous views of it are passed; the base must follow
    strided = base.t()[1:, ::2]
    strided.copy_(k * pattern(tuple(strided.shape), torch.float32))
    outer = torch.full((5, 3), -7.0)  # only rows 1..2 are passed
    return {
        "matrix": k * pattern((3, 4), torch.float32),
        "scalar": k * pattern((), torch.float64),
        "ints": k * pattern((9,), torch.int64),
        "half": k * pattern((5,), torch.float16),
        "bf16": k * pattern((2, 3), torch.bfloat16),
        "empty": torch.empty(0, 3),
        "strided": strided,
        "base": base,
        "rows": outer[1:3].copy_(k * pattern((2, 3), torch.float32)),
        "outer": outer,
        "big": k * pattern((40, 25), torch.float32),
    }


PASSED = ["matrix", "scalar", "ints", "half", "strided", "empty", "bf16", "rows", "big"]


class Recorder:
    """A collective that logs each launch and each wait, to see how many buckets there were
    and that all of them were in flight before the first wait."""

    def __init__(self, op) -> None:
        self.op, self.events = op, []

    def __call__(self, buffer: torch.Tensor, async_op: bool):
        assert async_op, "communicate() must launch asynchronously"
        self.events.append(("launch", buffer.dtype, buffer.numel()))
        work = self.op(buffer, async_op=True)
        events = self.events

        class Waited:
            def wait(self):
                events.append(("wait",))
                return work.wait()

        return Waited()


def check_group(rank: int, n: int, group) -> None:
    total = n * (n + 1) // 2
    reduce = functools.partial(dist.all_reduce, group=group)

    for bucket_bytes in (None, 64):
        t = contribution(rank)
        ids = {name: (id(t[name]), t[name].data_ptr()) for name in PASSED}
        alias = t["matrix"].view(-1)  # a view taken before the call sees the result
        recorder = Recorder(reduce)
        communicate([t[name] for name in PASSED], recorder, bucket_bytes=bucket_bytes)
        where = f"group of {n}, rank {rank}, bucket_bytes={bucket_bytes}"
        for name in ("matrix", "scalar", "ints", "half", "bf16", "rows", "big"):
            want = total * pattern(tuple(t[name].shape), t[name].dtype)
            assert torch.equal(t[name], want), f"{name} wrong ({where}): {t[name]}"
        assert torch.equal(t["strided"], total * pattern((4, 3), torch.float32)), where
        # The strided view wrote through to its base, and nowhere else.
        assert torch.equal(t["base"].t()[1:, ::2], t["strided"])
        assert t["base"].t()[0].eq(0).all() and t["base"].t()[:, 1::2].eq(0).all(), where
        assert t["outer"][[0, 3, 4]].eq(-7).all(), f"rows outside the view changed ({where})"
        assert torch.equal(alias, t["matrix"].view(-1))
        assert ids == {name: (id(t[name]), t[name].data_ptr()) for name in PASSED}

        launches = [e for e in recorder.events if e[0] == "launch"]
        first_wait = recorder.events.index(("wait",))
        assert first_wait == len(launches), "a bucket was waited for before all were launched"
        if bucket_bytes is None:
            # One flat buffer per dtype; the empty tensor is not sent at all.
            assert sorted(str(e[1]) for e in launches) == sorted(
                ["torch.float32", "torch.float64", "torch.int64", "torch.float16", "torch.bfloat16"]
            ), launches
        else:
            sent = [t[name] for name in PASSED if t[name].numel()]
            plan = plan_buckets(sent, bucket_bytes)
            assert len(plan) > 5, "a 64-byte cap must split the float32 tensors"
            assert [e[2] for e in launches] == [sum(sent[i].numel() for i in b) for b in plan]

    # average=True divides by the group's size; a partial with op= and src= works too.
    t = contribution(rank)
    communicate([t["matrix"], t["half"], t["strided"]], reduce, average=True, bucket_bytes=32)
    mean = (n + 1) / 2
    assert torch.equal(t["matrix"], mean * pattern((3, 4), torch.float32))
    assert torch.equal(t["half"], mean * pattern((5,), torch.float16))
    assert torch.equal(t["strided"], mean * pattern((4, 3), torch.float32))

    t = contribution(rank)
    communicate(
        [t["ints"], t["matrix"]],
        functools.partial(dist.all_reduce, op=dist.ReduceOp.MAX, group=group),
    )
    assert torch.equal(t["ints"], n * pattern((9,), torch.int64))
    assert torch.equal(t["matrix"], n * pattern((3, 4), torch.float32))
    t = contribution(rank)
    communicate([t["big"], t["strided"]], functools.partial(dist.broadcast, src=n - 1, group=group))
    assert torch.equal(t["big"], n * pattern((40, 25), torch.float32))
    assert torch.equal(t["strided"], n * pattern((4, 3), torch.float32))

    # The persistent mode gives the copying mode's results, in the same tensor objects, which
    # now live in the bucket buffers; a second call (each training step) is right again.
    for bucket_bytes in (None, 64):
        copied, viewed = contribution(rank), contribution(rank)
        objects = [id(viewed[name]) for name in PASSED]
        views = BucketViews([viewed[name] for name in PASSED], bucket_bytes)
        where = f"group of {n}, rank {rank}, BucketViews({bucket_bytes})"
        sent = [copied[name] for name in PASSED if copied[name].numel()]
        assert len(views.buffers) == len(plan_buckets(sent, bucket_bytes)), where
        for _ in range(2):
            communicate([copied[name] for name in PASSED], reduce, bucket_bytes=bucket_bytes)
            views.communicate(reduce)
            for name in PASSED:
                assert torch.equal(viewed[name], copied[name]), f"{name} ({where})"
        assert objects == [id(viewed[name]) for name in PASSED], where
        for members, buffer in views.buckets:
            start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.nbytes
            assert all(start <= t.data_ptr() < end for t in members), where
    t = contribution(rank)
    BucketViews([t["matrix"], t["half"]], bucket_bytes=16).communicate(reduce, average=True)
    assert torch.equal(t["matrix"], (n + 1) / 2 * pattern((3, 4), torch.float32))
    assert torch.equal(t["half"], (n + 1) / 2 * pattern((5,), torch.float16))

    communicate([], reduce)  # nothing to do, and no collective that peers would wait for
    communicate_async([], reduce).wait()


def communicate_checks(rank: int, world_size: int) -> list[int]:
    """Runs on every rank of tests.comm_world: the checks for groups of 2, 3 and 4 ranks.
    Returns the group sizes this rank checked."""
    checked = []
    for n in (2, 3, 4):
        group = dist.new_group(list(range(n)))  # every rank must take part in new_group
        if rank < n:
            check_group(rank, n, group)
            checked.append(n)
    dist.barrier()
    return checked


@pytest.mark.oracle
def test_closed_form_sums_at_2_3_and_4_ranks():
    checked = [r["communicate"] for r in comm_world.results()]
    assert checked == [[2, 3, 4], [2, 3, 4], [3, 4], [4]]


def test_flatten_unflatten_round_trip_and_buckets():
    a = torch.arange(12.0).reshape(3, 4)
    b = torch.arange(20.0).reshape(4, 5).t()  # non-contiguous
    flat = flatten([a, b])
    assert flat.is_contiguous() and flat.tolist() == a.flatten().tolist() + b.flatten().tolist()
    flat.neg_()
    unflatten(flat, [a, b])
    assert torch.equal(a, -torch.arange(12.0).reshape(3, 4))
    assert torch.equal(b, -torch.arange(20.0).reshape(4, 5).t())

    f32 = [torch.zeros(n) for n in (10, 10, 30, 5, 1)]
    # 40-byte tensors, a 120-byte one (over the cap: alone), then 20 + 4 bytes.
    assert plan_buckets(f32, bucket_bytes=80) == [[0, 1], [2], [3, 4]]
    assert plan_buckets(f32, bucket_bytes=80, first_bucket_bytes=40) == [[0], [1], [2], [3, 4]]
    mixed = [torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.zeros(2)]
    assert plan_buckets(mixed, bucket_bytes=None) == [[0, 2], [1]]


def test_average_refuses_integer_tensors():
    with pytest.raises(TypeError, match="int64"):
        communicate(
            [torch.zeros(2), torch.zeros(2, dtype=torch.int64)], dist.all_reduce, average=True
        )


def test_from_comm_import_communicate_is_the_function():
    """The natural import gives the callable, and the module keeps the rest of its names."""
    import importlib

    from comm import communicate as imported

    assert imported is communicate and callable(imported)
    module = importlib.import_module("comm.communicate")
    assert module.communicate is communicate and module.flatten is flatten


def test_bucket_views_keep_parameters_optimizer_and_autograd_working():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    early_view = params[0].view(-1)  # taken before set_: cut loose from the parameter
    optimizer = torch.optim.SGD(params, lr=0.5)
    views = BucketViews(params, bucket_bytes=64)
    (buffer_a, buffer_b) = views.buffers[:2]
    # Same objects, same values, now inside the buffers (first bucket: 0.weight, 0.bias).
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert params[0].data_ptr() == buffer_a.data_ptr() and params[0].is_leaf
    assert params[0].requires_grad and isinstance(params[0], torch.nn.Parameter)
    # Writing to the buffer is writing to the parameters, and the reverse.
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    moved = params[0].detach().clone()
    assert not torch.equal(moved, before[0])
    assert torch.equal(buffer_a[: moved.numel()].view_as(moved), moved)
    assert torch.equal(early_view, before[0].view(-1)), "a view from before set_ stays behind"
    buffer_b.zero_()
    assert views.buckets[1][0][0].eq(0).all()


def test_flatten_and_unflatten_are_one_call_each():
    # 200 tensors would take 200 dispatches from a Python loop; here each direction is one
    # call into C++ (which loops over the tensors itself).
    tensors = [torch.full((3,), float(i)) for i in range(200)]
    with torch.profiler.profile() as prof:
        flat = flatten(tensors)
        unflatten(flat * 2, tensors)
    top_level = [e.name for e in prof.events() if e.cpu_parent is None]
    assert top_level == [
        "aten::flatten_dense_tensors",
        "aten::mul",
        "aten::unflatten_dense_tensors",
        "aten::_foreach_copy_",
    ]
    assert tensors[7].eq(14).all()


def test_ddp_bucket_plan_equals_ddps_own():
    """The library twin: torch's compute_bucket_assignment_by_size (what DDP's reducer calls,
    with tensor_indices given: the rebuilt buckets, in the order gradients became ready)."""
    from training.models import build_model

    resnet = [p.detach() for p in build_model("resnet18", 3, 32, 10).parameters()][::-1]
    mixed = [torch.zeros(3), torch.zeros(5, dtype=torch.float64), torch.zeros(7)]
    mixed += [torch.zeros(1, dtype=torch.float64), torch.zeros(9), torch.zeros(40)]
    for tensors, first, cap in [(resnet, 2**20, 25 * 2**20), (mixed, 16, 40), (mixed, 40, 40)]:
        n = len(tensors)
        want, _ = dist._compute_bucket_assignment_by_size(
            tensors, [first, cap], [False] * n, list(range(n))
        )
        assert plan_buckets_like_ddp(tensors, cap, first) == want
    # resnet18: DDP's last bucket (what is left when backward ends) is 8.3 MiB.
    last = plan_buckets_like_ddp(resnet, 25 * 2**20, 2**20)[-1]
    assert sum(resnet[i].numel() * 4 for i in last) / 2**20 == pytest.approx(8.33, abs=0.01)
