"""Analytic backward registered on the fused ops (nino_fast.ops.backward): gradcheck in float64 on small random CSR
graphs (empty rows, a single edge, no edges), and gradients equal to autograd through the reference ops."""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import dispatch, reference
from nino_fast.testing import CASES, random_inputs
from nino_fast.testing import call_op as call
from nino_fast.testing import grad_names as inputs

# gradcheck needs a float64-exact forward: the reference's. (The kernels accept float64 but accumulate in float32,
# too coarse for finite differences.) The backward checked is the same code whatever the forward's backend; the
# float32 test below runs it after every available kernel.
F64_BACKENDS = ["reference"]
GRAPHS = [(3, 0), (1, 1), (4, 1), (6, 15), (9, 30)]  # (nodes, edges): no edges, one edge, empty rows


def make(n_nodes, n_edges, c=3, d=4, d_out=5, n_types=3, seed=0, dtype=torch.float64, hub=0, weight_scale=0.7):
    """Random inputs (every float requiring grad) on a destination-sorted CSR graph of ``n_edges`` random edges plus
    ``hub`` edges into row ``n_nodes // 2``; weight matrices drawn with std ``weight_scale``, the rest with 0.7."""
    return random_inputs(
        n_nodes,
        n_edges,
        c,
        d,
        d_out,
        n_types,
        hub,
        seed,
        dtype,
        scale=0.7,
        requires_grad=True,
        weight_scale=weight_scale,
    )


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("op, opts", CASES)
@pytest.mark.parametrize("n_nodes, n_edges", GRAPHS)
def test_gradcheck_float64(backend, op, opts, n_nodes, n_edges):
    x = make(n_nodes, n_edges, seed=n_nodes * 31 + n_edges)
    names = inputs(op, **opts)

    def fn(*vals):
        return call(op, dispatch, {**x, **dict(zip(names, vals, strict=True))}, backend, **opts)

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


DEVICE_BACKENDS = [("cpu", b) for b in dispatch.available_backends("cpu")]
if torch.cuda.is_available():  # the CUDA extension and Triton kernels forward, the same backward on the GPU
    DEVICE_BACKENDS += [("cuda", b) for b in dispatch.available_backends("cuda")]


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("op, opts", CASES)
def test_matches_autograd_through_reference(device, backend, op, opts):
    """float32 gradients of the fused forward + analytic backward = autograd through the oracle."""
    x = make(40, 300, c=45, d=16, d_out=24, n_types=15, seed=7, dtype=torch.float32)
    x = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in x.items()}
    ins = [x[k] for k in inputs(op, **opts)]
    out = call(op, dispatch, x, backend, **opts)
    gout = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, gout)
    want_out = call(op, reference, x, **opts)
    want = torch.autograd.grad(want_out, ins, gout)
    torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
    for g, w in zip(got, want, strict=True):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, atol=2e-4 * scale, rtol=1e-4)


def test_no_grad_is_plain_dispatch():
    """Without gradients the ops build no autograd node (inference pays nothing); with them, the node is the
    autograd formula registered on the op itself (torch.ops.nino_fast.film_mean is differentiable)."""
    x = make(6, 15, dtype=torch.float32)
    with torch.no_grad():
        out = call("film_mean", dispatch, x)
    assert out.grad_fn is None
    out = call("film_mean", dispatch, x)
    assert "nino_fast_film_mean" in type(out.grad_fn).__name__
