"""Fused CPU backward kernels (csrc/cpu/*_backward_kernel.cpp) against the PyTorch backward formulas of
nino_fast.ops.backward (themselves gradchecked in float64 and checked against autograd through the reference ops,
tests/test_autograd.py): random graphs with empty rows, one edge, no edges, a row of thousands of edges, widths
that are not multiples of 16, enough edges to cross the kernels' task and chunk boundaries; determinism across
thread counts; which inputs get a gradient; fallbacks and input errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nino_fast.ops import backward as bw
from nino_fast.ops import dispatch
from nino_fast.testing import CASES, random_inputs
from nino_fast.testing import call_op as call
from nino_fast.testing import grad_names as inputs

from conftest import needs_ext

pytestmark = needs_ext

KERNEL = {op: f"{op}_backward" for op in ("film_mean", "edge_mlp", "edge_film_mean")}

# name: (nodes, edges, hub edges into one row, c, d, d_out): hub rows span several of the kernels' row tasks
# (4096 edges) and weight-gradient chunks (1536 edges, more when there would be over 256 chunks); "many chunks"
# also spans several waves (65536 edges: the per-edge rows kept for the node gradients' scatter)
GRAPHS = {
    "no edges": (5, 0, 0, 3, 16, 16),
    "one edge": (1, 1, 0, 3, 4, 5),
    "empty rows": (50, 30, 0, 9, 20, 40),
    "odd widths": (40, 700, 0, 45, 20, 24),
    "model widths": (300, 5000, 0, 45, 64, 64),
    "hub row": (60, 1000, 9000, 45, 32, 40),
    "wide head": (30, 400, 0, 64, 64, 360),
    "many chunks": (2000, 400_000, 0, 3, 4, 5),  # edge_mlp: over 256 chunks of 32 tiles, so longer chunks
}


def graph(n, e, hub, c, d, d_out, seed=0):
    """Random float32 inputs (GRAPHS' shapes) with 15 edge types and smaller weights."""
    opts = dict(scale=0.7, requires_grad=True, weight_scale=0.3)
    return random_inputs(n, e, c, d, d_out, 15, hub, seed, torch.float32, **opts)


def grads(op, opts, x, fused: bool, feat_grad: bool = True, dtype=torch.float32):
    """Gradients of every differentiable input of ``op`` (float64: forward by the reference ops, backward by
    the formulas: the ground truth)."""
    names = [k for k in inputs(op, **opts) if feat_grad or k != "feat"]
    x = {
        k: v.detach().to(dtype).requires_grad_(k in names)
        if isinstance(v, torch.Tensor) and v.is_floating_point()
        else v
        for k, v in x.items()
    }
    backend = "cpu" if dtype == torch.float32 else "reference"
    with bw.fused_backward(fused):
        out = call(op, dispatch, x, backend, **opts)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        return names, torch.autograd.grad(out, [x[k] for k in names], gout)


@pytest.mark.parametrize("op, opts", CASES)
@pytest.mark.parametrize("shape", GRAPHS.values(), ids=GRAPHS.keys())
def test_matches_formulas(op, opts, shape):
    """Against the float64 truth, the kernel's float32 gradients are as exact as the float32 formulas' (up to 2x
    their error, or 1e-6 of the gradient's scale): the two sum in different orders, neither is the reference."""
    x = graph(*shape)
    assert bw.fused_cpu(KERNEL[op], [x["feat"]], [x["src"]])
    names, got = grads(op, opts, x, fused=True)
    _, want = grads(op, opts, x, fused=False)
    _, truth = grads(op, opts, x, fused=False, dtype=torch.float64)
    for name, g, w, t in zip(names, got, want, truth, strict=True):
        assert g.shape == t.shape and g.dtype == torch.float32, name
        if not t.numel():
            continue
        scale = t.abs().max().item()
        err, err_formula = (g.double() - t).abs().max().item(), (w.double() - t).abs().max().item()
        assert err <= max(2 * err_formula, 1e-6 * scale, 1e-9), f"{op} d{name}: {err:.3g} vs formulas {err_formula:.3g}"


def test_bias_gradient_is_the_rounded_sum():
    """edge_mlp's last bias gradient is the column sum of the upstream gradient over the edges; summed in float64
    (400K edges, ~250 chunks, terms of both signs) it is their exact sum rounded once to float32. In float32 chunk
    partials it lost 4e-5 of a sum of scale 1,300 (one to two ulps; ATen's float32 sum, up to 5e-4)."""
    x = graph(*GRAPHS["many chunks"])
    opts = dict(table=False, gathers=False, act_out=False)
    x = {k: v.detach().requires_grad_(k == "bb") if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    with bw.fused_backward(True):
        out = call("edge_mlp", dispatch, x, "cpu", **opts)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (got,) = torch.autograd.grad(out, [x["bb"]], gout)
    assert "bb" in inputs("edge_mlp", **opts) and bw.fused_cpu(KERNEL["edge_mlp"], [x["feat"]], [x["src"]])
    assert torch.equal(got, gout.double().sum(0).float())


@pytest.mark.parametrize("op, opts", CASES)
def test_feat_gradient_only_when_needed(op, opts):
    """A feature tensor without requires_grad gets no gradient (the kernel skips that GEMM); the others match."""
    x = graph(*GRAPHS["odd widths"])
    names, got = grads(op, opts, x, fused=True, feat_grad=False)
    assert "feat" not in names
    _, want = grads(op, opts, x, fused=False, feat_grad=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, w.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("op, opts", CASES)
@pytest.mark.parametrize("shape", ["hub row", "many chunks"])
def test_deterministic_across_threads(op, opts, shape):
    """Bitwise the same gradients with 1 and 2 threads and on a repeated call (no atomics, fixed reduction
    order)."""
    if opts.get("readout"):
        pytest.skip("edge_mlp's readout layers backpropagate through ATen matmuls (split by thread count)")
    x = graph(*GRAPHS[shape])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = grads(op, opts, x, fused=True)
        torch.set_num_threads(2)
        _, two = grads(op, opts, x, fused=True)
        _, again = grads(op, opts, x, fused=True)
    finally:
        torch.set_num_threads(prev)
    for a, b, c in zip(one, two, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_falls_back_outside_float32_cpu():
    """float64 tensors, other index dtypes or the switch turned off: the PyTorch formulas (no kernel)."""
    x = graph(*GRAPHS["one edge"])
    assert not bw.fused_cpu("edge_mlp_backward", [x["feat"].double()], [x["src"]])
    assert not bw.fused_cpu("edge_mlp_backward", [x["feat"]], [x["src"].short()])
    with bw.fused_backward(False):
        assert not bw.fused_cpu("edge_mlp_backward", [x["feat"]], [x["src"]])
    assert bw.fused_cpu("edge_mlp_backward", [x["feat"]], [x["src"]])  # restored on exit


def test_environment_switch():
    """NINO_FAST_FUSED_BACKWARD=0 turns the kernels off for the process (read at import)."""
    code = "from nino_fast.ops import backward; print(backward.fused_enabled())"
    env = {**os.environ, "NINO_FAST_FUSED_BACKWARD": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_grad_out_is_a_clear_error():
    x = graph(*GRAPHS["empty rows"])
    f = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    with pytest.raises(RuntimeError, match=r"edge_mlp_backward: grad_out must have shape \[30, 40\]"):
        torch.ops.nino_fast.edge_mlp_backward(
            torch.zeros(30, 7), f["feat"], f["src"], f["dst"], f["Wa"], f["ba"], f["Wb"], f["bb"],
            None, None, None, None, None, None, False, None, None, None, None, True,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"edge_mlp_backward: takes no readout layers"):
        torch.ops.nino_fast.edge_mlp_backward(
            torch.zeros(30, 40), f["feat"], f["src"], f["dst"], f["Wa"], f["ba"], f["Wb"], f["bb"],
            None, None, None, None, None, None, False, f["Wb"].t(), f["ba"], None, None, True,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"film_mean_backward: grad_out must have shape \[50, 20\]"):
        torch.ops.nino_fast.film_mean_backward(
            torch.zeros(49, 20),
            f["feat"],
            f["rowptr"],
            f["src"],
            f["nd"],
            f["ns"],
            f["W2"],
            f["b2"],
            None,
            None,
            None,
            True,
        )


@pytest.mark.parametrize("op, opts", CASES)
def test_int64_indices_same_bits(op, opts):
    """int64 src / dst (PyG's edge_index dtype) give the int32 results bitwise, forward and fused backward."""
    x = graph(*GRAPHS["hub row"])
    x64 = {**x, "src": x["src"].long(), "dst": x["dst"].long()}
    assert bw.fused_cpu(KERNEL[op], [x["feat"]], [x64["src"]])
    _, want = grads(op, opts, x, fused=True)
    _, got = grads(op, opts, x64, fused=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    big = {**x64, "src": x64["src"] + 2**31}  # does not fit int32: refused, not wrapped around
    with pytest.raises(RuntimeError, match="src values must fit int32"):
        call(op, dispatch, big, "cpu", **opts)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["film_mean", "edge_film_mean"])
def test_weight_gradients_of_a_row_of_a_million_edges(op):
    """A row's edges all fall in one of the FiLM kernels' row tasks; its weight, bias and type-table gradients must
    not add a million float32 terms one after the other into one sum (relative error ~1e-3 on film_mean's table,
    3e-6 on the weights before the task partials were staged): weights and biases within 2e-6 of the float64
    truth's scale, the table within 1e-5 (the float32 PyTorch formulas: 3.3e-3)."""
    x = random_inputs(4, 10, 3, 8, 8, 3, 1_000_000, 0, torch.float32, requires_grad=True)
    opts = dict(table=True)
    names, got = grads(op, opts, x, fused=True)
    _, truth = grads(op, opts, x, fused=False, dtype=torch.float64)
    bounds = {"W2": 2e-6, "b2": 2e-6, "T2": 1e-5, "Wa": 2e-6, "ba": 2e-6, "Wsc": 2e-6, "bsc": 2e-6}
    checked = 0
    for name, g, t in zip(names, got, truth, strict=True):
        if name in bounds:
            err = (g.double() - t).abs().max().item() / t.abs().max().item()
            assert err <= bounds[name], f"{op} d{name}: {err:.3g}"
            checked += 1
    assert checked == (3 if op == "film_mean" else 4)
