"""The gather/scatter_ demos: every printed result, and the loop definitions they are checked
against, agree with torch (in 3-D and along every dim, not only the worked examples)."""

import pytest
import torch

from core.errors import UsageError
from study import gather_scatter as indexing


@pytest.mark.oracle
def test_demos_print_the_hand_computed_results(capsys):
    results = indexing.main([])
    out = capsys.readouterr().out
    assert "== torch.gather" in out and "== pitfalls" in out
    assert results["gather"]["dim1"].tolist() == [[12, 10], [21, 21]]
    assert results["gather"]["dim0"].tolist() == [[20, 11, 22]]
    assert results["scatter"]["dim1"].tolist() == [[2, 0, 0, 1], [0, 3, 4, 0]]
    assert results["scatter"]["dim0"].tolist() == [[3, 2], [1, 4]]
    assert results["target_logits"].tolist() == [2.0, 1.0, 4.0]
    assert results["one_hot"].tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert results["scatter_add"]["histogram"].tolist() == [1, 3, 0, 2]
    assert results["scatter_add"]["segment_sums"].tolist() == [[4, 40], [0, 0], [6, 60]]
    assert results["topk_mask"].tolist() == [[False, True, False, True], [True, False, True, False]]
    pit = results["pitfalls"]
    assert pit["out_of_place_keeps_input"] and pit["duplicate_write"] in (1.0, 2.0)
    assert "leaf Variable" in pit["leaf_inplace_error"]
    assert "modified by an inplace operation" in pit["saved_tensor_error"]
    assert pit["gather_grad"].tolist() == [3.0, 0.0, 1.0]


@pytest.mark.oracle
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_loop_definitions_match_torch_in_3d(dim):
    g = torch.Generator().manual_seed(dim)
    src = torch.randn(3, 4, 5, generator=g)
    index = torch.randint(0, src.shape[dim], (2, 3, 4), generator=g)
    assert torch.equal(indexing.naive_gather(src, dim, index), src.gather(dim, index))
    # scatter_add accumulates duplicates, and the loop may add them in another order than
    # torch's kernel. Error model: in float64 each output is a sum of at most 4 values below
    # 5 in magnitude, so two orders differ by at most 3 roundings of 20 x u (u = 1.1e-16),
    # < 1e-14: atol 1e-12 leaves 100x; a dropped or misplaced value costs ~1.
    zeros = torch.zeros(3, 4, 5, dtype=torch.float64)
    values = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        indexing.naive_scatter(zeros, dim, index, values, add=True),
        zeros.scatter_add(dim, index, values),
        rtol=0,
        atol=1e-12,
    )
    # plain scatter: a permutation along dim, so no two writes collide
    perm = torch.stack([torch.randperm(src.shape[dim], generator=g) for _ in range(4)], -1)
    shape = [1, 1, 1]
    shape[dim] = src.shape[dim]
    index = perm[: src.shape[dim], :1].reshape(shape).expand_as(src).contiguous()
    dst = torch.zeros(3, 4, 5)
    assert torch.equal(indexing.naive_scatter(dst, dim, index, src), dst.scatter(dim, index, src))


def test_unknown_demo_is_a_usage_error():
    with pytest.raises(UsageError, match="--only"):
        indexing.main(["--only", "nope"])
