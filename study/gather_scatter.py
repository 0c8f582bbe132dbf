"""`torch.gather` and `Tensor.scatter_`: what `dim` and `index` mean, what they are good for,
and where they bite. Every result is checked against a plain Python loop.

    python -m study.gather_scatter

The two rules, for a 2-D tensor (the same holds in any number of dimensions: `index` replaces
the coordinate along `dim`, every other coordinate is kept):

    out = src.gather(1, index)     out[i][j] = src[i][index[i][j]]
    out = src.gather(0, index)     out[i][j] = src[index[i][j]][j]
    dst.scatter_(1, index, src)    dst[i][index[i][j]] = src[i][j]
    dst.scatter_(0, index, src)    dst[index[i][j]][j] = src[i][j]

gather reads through the index, scatter_ writes through it: they are each other's inverse
where the index is a permutation, and scatter_add_ is the gradient of gather.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from core.cli import Parser
from core.dist import StdoutHandler, choose_threads
from core.errors import run_cli

log = logging.getLogger("indexing")


def _coords(shape: torch.Size):
    return itertools.product(*(range(n) for n in shape))


def naive_gather(src: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The definition of torch.gather, one element at a time."""
    out = torch.empty(index.shape, dtype=src.dtype)
    for pos in _coords(index.shape):
        at = list(pos)
        at[dim] = int(index[pos])
        out[pos] = src[tuple(at)]
    return out


def naive_scatter(
    dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, add: bool = False
) -> torch.Tensor:
    """The definition of Tensor.scatter (add=False) and scatter_add (add=True), out of place."""
    out = dst.clone()
    for pos in _coords(index.shape):
        at = list(pos)
        at[dim] = int(index[pos])
        out[tuple(at)] = out[tuple(at)] + src[pos] if add else src[pos]
    return out


def _check(title: str, got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    assert torch.equal(got, want), f"{title}: {got} != {want}"
    log.info("%s\n%s", title, got)
    return got


def demo_gather_rule() -> dict[str, torch.Tensor]:
    """gather along dim 1 picks columns per row; along dim 0 picks rows per column."""
    src = torch.tensor([[10, 11, 12], [20, 21, 22]])
    log.info("\n== torch.gather\nsrc =\n%s", src)
    index1 = torch.tensor([[2, 0], [1, 1]])
    index0 = torch.tensor([[1, 0, 1]])
    return {
        "dim1": _check(
            "src.gather(1, [[2, 0], [1, 1]]): row i takes columns index[i]  (out[i][j] = "
            "src[i][index[i][j]])",
            src.gather(1, index1),
            naive_gather(src, 1, index1),
        ),
        "dim0": _check(
            "src.gather(0, [[1, 0, 1]]): column j takes row index[0][j]  (out[i][j] = "
            "src[index[i][j]][j])",
            src.gather(0, index0),
            naive_gather(src, 0, index0),
        ),
    }


def demo_scatter_rule() -> dict[str, torch.Tensor]:
    """scatter_ writes src[i][j] to the position that index names."""
    dst = torch.zeros(2, 4, dtype=torch.long)
    src = torch.tensor([[1, 2], [3, 4]])
    index = torch.tensor([[3, 0], [1, 2]])
    log.info("\n== Tensor.scatter_\ndst = zeros(2, 4), src = %s", src.tolist())
    got1 = dst.clone().scatter_(1, index, src)
    index0 = torch.tensor([[1, 0], [0, 1]])
    got0 = torch.zeros(2, 2, dtype=torch.long).scatter_(0, index0, src)
    return {
        "dim1": _check(
            "dst.scatter_(1, [[3, 0], [1, 2]], src): dst[i][index[i][j]] = src[i][j]",
            got1,
            naive_scatter(dst, 1, index, src),
        ),
        "dim0": _check(
            "zeros(2, 2).scatter_(0, [[1, 0], [0, 1]], src): dst[index[i][j]][j] = src[i][j]",
            got0,
            naive_scatter(torch.zeros(2, 2, dtype=torch.long), 0, index0, src),
        ),
    }


def demo_target_logits() -> torch.Tensor:
    """Cross-entropy is -log_softmax picked at each sample's target: a gather along dim 1."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]])
    target = torch.tensor([0, 2, 2])
    log.info(
        "\n== picking each sample's target logit\nlogits =\n%s\ntarget = %s",
        logits,
        target.tolist(),
    )
    picked = logits.gather(1, target[:, None]).squeeze(1)
    loop = torch.stack([logits[i, target[i]] for i in range(len(target))])
    _check("logits.gather(1, target[:, None]).squeeze(1)", picked, loop)
    nll = -F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(nll, F.cross_entropy(logits, target, reduction="none"))
    log.info("-log_softmax(logits).gather(...) equals F.cross_entropy(..., reduction='none')")
    return picked


def demo_one_hot() -> torch.Tensor:
    """One-hot rows: write a 1 at column target[i] of row i."""
    target = torch.tensor([2, 0, 1, 2])
    log.info("\n== one-hot by scatter_\ntarget = %s", target.tolist())
    hot = torch.zeros(len(target), 3, dtype=torch.long).scatter_(1, target[:, None], 1)
    loop = torch.zeros(len(target), 3, dtype=torch.long)
    for i, t in enumerate(target.tolist()):
        loop[i][t] = 1
    _check("zeros(4, 3).scatter_(1, target[:, None], 1)", hot, loop)
    assert torch.equal(hot, F.one_hot(target, 3))
    return hot


def demo_scatter_add() -> dict[str, torch.Tensor]:
    """scatter_add_ accumulates where several indices collide: histograms and segment sums."""
    labels = torch.tensor([1, 3, 1, 0, 1, 3])
    log.info("\n== scatter_add_: colliding indices add up\nlabels = %s", labels.tolist())
    hist = torch.zeros(4, dtype=torch.long).scatter_add_(0, labels, torch.ones_like(labels))
    loop = torch.zeros(4, dtype=torch.long)
    for c in labels.tolist():
        loop[c] += 1
    _check("histogram: zeros(4).scatter_add_(0, labels, ones)", hist, loop)
    assert torch.equal(hist, torch.bincount(labels, minlength=4))

    # Segment sums: rows of `values` that share a segment id are summed into one output row
    # (a graph network's message aggregation, a per-class mean of features).
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    segment = torch.tensor([0, 2, 0, 2])
    index = segment[:, None].expand_as(values)  # the same row id for every column
    log.info("values =\n%s\nsegment = %s (the output row of each row of values)", values,
             segment.tolist())  # fmt: skip
    sums = torch.zeros(3, 2).scatter_add_(0, index, values)
    loop_sums = torch.zeros(3, 2)
    for row, s in enumerate(segment.tolist()):
        loop_sums[s] += values[row]
    _check(
        "segment sums: zeros(3, 2).scatter_add_(0, segment[:, None].expand_as(values), values)",
        sums,
        loop_sums,
    )
    return {"histogram": hist, "segment_sums": sums}


def demo_topk_mask() -> torch.Tensor:
    """A boolean mask of each row's k largest entries: scatter True at topk's indices."""
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7], [0.8, 0.2, 0.6, 0.4]])
    log.info("\n== top-k mask (k = 2)\nscores =\n%s", scores)
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(2, 1).indices, True)
    loop = torch.zeros_like(scores, dtype=torch.bool)
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: -row[j])[:2]:
            loop[i][j] = True
    return _check("zeros_like(scores, bool).scatter_(1, scores.topk(2).indices, True)", mask, loop)


def demo_pitfalls() -> dict[str, object]:
    """In place vs out of place, duplicate indices, and autograd."""
    log.info("\n== pitfalls")
    found: dict[str, object] = {}

    # 1. scatter (no underscore) returns a new tensor and leaves its input alone.
    x = torch.zeros(3)
    y = x.scatter(0, torch.tensor([1]), torch.tensor([5.0]))
    assert torch.equal(x, torch.zeros(3)) and torch.equal(y, torch.tensor([0.0, 5.0, 0.0]))
    x.scatter_(0, torch.tensor([1]), torch.tensor([5.0]))
    assert torch.equal(x, y)
    log.info(
        "x = zeros(3); x.scatter(0, [1], [5.]) returns a new tensor, x unchanged; "
        "x.scatter_(0, [1], [5.]) changes x"
    )
    found["out_of_place_keeps_input"] = True

    # 2. scatter_ with repeated indices: one of the writes survives, which one is unspecified
    #    (and differs between CPU and CUDA). Use scatter_add_ / scatter_reduce_ to combine.
    z = torch.zeros(2).scatter_(0, torch.tensor([0, 0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    assert z[0].item() in (1.0, 2.0) and z[1].item() == 3.0
    log.info(
        "zeros(2).scatter_(0, [0, 0, 1], [1., 2., 3.]): position 0 holds 1 or 2, unspecified which"
    )
    found["duplicate_write"] = z[0].item()

    # 3. In place on a leaf that requires grad is refused: autograd could not say what the
    #    gradient of the overwritten values would be.
    leaf = torch.zeros(3, requires_grad=True)
    try:
        leaf.scatter_(0, torch.tensor([0]), torch.tensor([1.0]))
        found["leaf_inplace_error"] = None
    except RuntimeError as e:
        found["leaf_inplace_error"] = str(e).split("\n")[0]
    assert found["leaf_inplace_error"] is not None
    log.info("zeros(3, requires_grad=True).scatter_(0, [0], [1.]), on a leaf: RuntimeError")

    # 4. In place on a tensor that backward still needs: the error comes later, at backward.
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    h = w * 2
    s = h.exp()  # exp saves its output for backward
    s.scatter_(0, torch.tensor([0]), torch.tensor([0.0]))  # ...which this overwrites
    try:
        s.sum().backward()  # exp's saved output was changed: its version counter moved
        found["saved_tensor_error"] = None
    except RuntimeError as e:
        found["saved_tensor_error"] = str(e).split("\n")[0]
    assert found["saved_tensor_error"] is not None
    log.info("s = (2 * w).exp(); s.scatter_(0, [0], [0.]): exp saved s for backward, so "
             "s.sum().backward() raises RuntimeError")  # fmt: skip

    # 5. The gradient of gather is a scatter_add of the incoming gradient: an element
    #    gathered twice gets its gradient twice.
    src = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    index = torch.tensor([0, 2, 0, 0])
    src.gather(0, index).sum().backward()
    loop = torch.zeros(3)
    for i in index.tolist():
        loop[i] += 1
    _check(
        "src = [1., 2., 3.]; grad of src.gather(0, [0, 2, 0, 0]).sum(): counts of each index",
        src.grad,
        loop,
    )
    found["gather_grad"] = src.grad

    # 6. Out of place scatter is differentiable: gradient flows to the written values, and
    #    not to the positions of the input they replaced.
    base = torch.ones(3, requires_grad=True)
    vals = torch.tensor([5.0], requires_grad=True)
    (base.scatter(0, torch.tensor([1]), vals) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(base.grad, torch.tensor([1.0, 0.0, 3.0]))
    assert torch.equal(vals.grad, torch.tensor([2.0]))
    log.info(
        "ones(3).scatter(0, [1], [5.]) * [1., 2., 3.], summed: the gradient is 0 at the "
        "replaced position 1 of the input, and 2 for the value 5 written there"
    )
    found["scatter_grads"] = (base.grad, vals.grad)
    return found


DEMOS = {
    "gather": demo_gather_rule,
    "scatter": demo_scatter_rule,
    "target_logits": demo_target_logits,
    "one_hot": demo_one_hot,
    "scatter_add": demo_scatter_add,
    "topk_mask": demo_topk_mask,
    "pitfalls": demo_pitfalls,
}


def run_all() -> dict[str, object]:
    """Run every demo (each asserts itself against its loop) and return the results."""
    return {name: demo() for name, demo in DEMOS.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = Parser(description=__doc__)
    p.add_argument("--only", choices=list(DEMOS), help="run this one demo")
    args = p.parse_args(argv)
    handler = StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    log.info("%s; the tensors are tiny", choose_threads())
    return {args.only: DEMOS[args.only]()} if args.only else run_all()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
