"""``feat_index`` of the CSR ops (film_mean, edge_film_mean): edge features in the caller's order, read through a
permutation, give the op on the features in CSR order, forward and every gradient (the feature gradient back in
the caller's order), on every CPU backend and through the fused backward kernels; bad indices are clear errors."""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import backward as bw
from nino_fast.ops import dispatch
from nino_fast.testing import grad_names, op_args, random_inputs

OPS = ("film_mean", "edge_film_mean")
# name: (nodes, edges, hub edges into one row); "waves" spans several of the backward kernels' 64K-edge waves
GRAPHS = {"hub row": (40, 900, 3000), "waves": (500, 150_000, 0)}


def _graph(shape, dtype=torch.float32):
    n, e, hub = shape
    return random_inputs(n, e, 7, 12, hub=hub, seed=3, dtype=dtype, weight_scale=0.3)


def _grads(op, x, backend, perm=None, fused=True):
    """Output and gradients of every differentiable input; with ``perm``: feat passed in the caller's order
    ``feat_caller[perm[p]] = feat[p]`` and read through ``feat_index=perm``."""
    names = grad_names(op)
    x = {k: v.detach().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    leaves = [x[k] for k in names]
    if perm is not None:
        caller = torch.empty_like(x["feat"]).index_copy_(0, perm, x["feat"].detach()).requires_grad_()
        x, leaves = {**x, "feat": caller}, [caller if k == "feat" else x[k] for k in names]
    kw = {} if perm is None else {"feat_index": perm}
    with bw.fused_backward(fused):
        out = getattr(dispatch, op)(*op_args(op, x), backend=backend, **kw)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, gout)
    if perm is not None:  # the feature gradient in CSR order, to compare
        grads = [g.index_select(0, perm) if k == "feat" else g for k, g in zip(names, grads, strict=True)]
    return out, grads


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("graph", GRAPHS, ids=GRAPHS.keys())
@pytest.mark.parametrize("backend, fused", [("cpu", True), ("cpu", False), ("reference", False), ("triton", False)])
def test_same_bits_as_csr_order(op, graph, backend, fused):
    """Through a random permutation: bitwise the op and gradients of the features in CSR order."""
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    if backend == "triton" and graph == "waves":
        pytest.skip("the waves are the CPU kernels'; too slow for Triton's interpreter")
    x = _graph(GRAPHS[graph])
    perm = torch.randperm(x["feat"].shape[0], generator=torch.Generator().manual_seed(7))
    want_out, want = _grads(op, x, backend, fused=fused)
    got_out, got = _grads(op, x, backend, perm=perm, fused=fused)
    assert torch.equal(got_out, want_out)
    for name, g, w in zip(grad_names(op), got, want, strict=True):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("op", OPS)
def test_float64_gradcheck(op):
    """The reference path's gradients through feat_index (float64 gradcheck, feature input only)."""
    x = _graph((6, 20, 5), dtype=torch.float64)
    perm = torch.randperm(x["feat"].shape[0], generator=torch.Generator().manual_seed(2))
    args = list(op_args(op, x))

    def f(feat):
        return getattr(dispatch, op)(feat, *args[1:], backend="reference", feat_index=perm)

    assert torch.autograd.gradcheck(f, (x["feat"].clone().requires_grad_(),))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_feat_index_is_a_clear_error(op, backend):
    if backend not in dispatch.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    x = _graph((8, 50, 0))
    args, e = op_args(op, x), x["feat"].shape[0]
    repeated = torch.arange(e)
    repeated[3] = 4  # in range, but not a permutation: one row read twice, one never
    bad = [
        ("a permutation", repeated),
        ("a permutation", torch.arange(e) + 1),  # out of range
        ("one entry per edge|1-D integer", torch.arange(e - 1)),
        ("int64 or int32|1-D integer", torch.arange(e).double()),
    ]
    for message, index in bad:
        with pytest.raises((RuntimeError, ValueError), match=message):
            getattr(dispatch, op)(*args, backend=backend, feat_index=index)
