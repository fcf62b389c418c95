"""The ops as registered: ``torch.library.opcheck`` (schema, fake, autograd registration, AOT dispatch) on every op
and every backend of the CPU (CUDA when there is a GPU), on small random CSR graphs (empty rows, one edge, no edges,
a huge-degree row); gradients of ``torch.ops.nino_fast.<op>`` itself against autograd through the reference; the
schemas equal the specification's signatures; torch.compile through forward and backward."""

from __future__ import annotations

import inspect

import pytest
import torch

from nino_fast.ops import dispatch, reference
from nino_fast.testing import CASES, assert_close_scaled, grad_names, op_args, random_inputs

OPS = torch.ops.nino_fast
# (nodes, edges, hub edges into one row): no edges, one edge, empty rows, a row of 600 edges
GRAPHS = {"no edges": (4, 0, 0), "one edge": (1, 1, 0), "empty rows": (12, 6, 0), "hub row": (9, 20, 600)}
DEVICE_BACKENDS = [("cpu", b) for b in dispatch.available_backends("cpu")]
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("cuda", b) for b in dispatch.available_backends("cuda")]


def _inputs(graph, device, dtype=torch.float32, seed=0):
    x = random_inputs(*GRAPHS[graph][:2], c=5, d=8, d_out=6, hub=GRAPHS[graph][2], seed=seed, dtype=dtype)
    return {k: v.to(device).requires_grad_(v.is_floating_point()) for k, v in x.items()}


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("op, opts", CASES)
def test_opcheck(device, backend, graph, op, opts):
    if backend == "triton" and graph == "hub row" and device == "cpu":
        pytest.skip("a 600-edge row is slow under Triton's interpreter")
    x = _inputs(graph, device)
    with dispatch.use_backend(backend):
        torch.library.opcheck(getattr(OPS, op), op_args(op, x, **opts))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("op, opts", CASES)
def test_gradients_match_reference(device, backend, graph, op, opts):
    """Output and every input gradient of the op (forward on ``backend``, the registered backward) equal autograd
    through the float64 reference."""
    if backend == "triton" and graph == "hub row" and device == "cpu":
        pytest.skip("a 600-edge row is slow under Triton's interpreter")
    x = _inputs(graph, device)
    names = grad_names(op, **{k: v for k, v in opts.items() if k != "act_out"})
    with dispatch.use_backend(backend):
        out = getattr(OPS, op)(*op_args(op, x, **opts))
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    got = torch.autograd.grad(out, [x[k] for k in names], gout)
    x64 = {k: v.detach().double().requires_grad_() if v.is_floating_point() else v for k, v in x.items()}
    want_out = getattr(reference, op)(*op_args(op, x64, **opts))
    want = torch.autograd.grad(want_out, [x64[k] for k in names], gout.double(), allow_unused=True)
    assert out.dtype == torch.float32
    assert_close_scaled(out, want_out)
    for k, g, w in zip(names, got, want, strict=True):
        assert_close_scaled(g, torch.zeros_like(x64[k]) if w is None else w, msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.parametrize("op, opts", CASES)
def test_gradcheck_float64(op, opts):
    """The registered backward is the derivative of the forward (float64, reference implementation)."""
    x = _inputs("empty rows", "cpu", dtype=torch.float64, seed=3)
    names = grad_names(op, **{k: v for k, v in opts.items() if k != "act_out"})

    def fn(*vals):
        return getattr(OPS, op)(*op_args(op, {**x, **dict(zip(names, vals, strict=True))}, **opts))

    with dispatch.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, tuple(x[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_film_mean"])
def test_schema_is_the_specification(op):
    """csrc/nino_fast.cpp's schema (or the Python one without the extension) is the reference's signature."""
    spec = torch.library.infer_schema(getattr(reference, op), mutates_args=())
    assert str(getattr(OPS, op).default._schema) == f"nino_fast::{op}{spec}"


@pytest.mark.parametrize("graph", GRAPHS)
def test_opcheck_segment_mean_csr(graph):
    if not hasattr(OPS, "segment_mean_csr"):
        pytest.skip("needs the compiled extension")
    x = _inputs(graph, "cpu")
    torch.library.opcheck(OPS.segment_mean_csr, (x["feat"], x["rowptr"]))
    f64 = x["feat"].detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: reference.segment_mean(f, x["rowptr"]), (f64,))
    f32 = x["feat"].detach().requires_grad_()
    g = torch.autograd.grad(OPS.segment_mean_csr(f32, x["rowptr"]).sum(), f32)[0]
    want = torch.autograd.grad(reference.segment_mean(f64, x["rowptr"]).sum(), f64)[0]
    assert_close_scaled(g, want)


@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_film_mean"])
def test_opcheck_fused_backward_ops(op):
    """The fused CPU backward kernels are ops too, with fakes (traced backward graphs hold them)."""
    if not hasattr(OPS, f"{op}_backward"):
        pytest.skip("needs the compiled extension")
    x = {k: v.detach() for k, v in _inputs("empty rows", "cpu").items()}
    args = op_args(op, x)
    gout = torch.randn_like(getattr(OPS, op)(*args))
    schema = getattr(OPS, op).default._schema.arguments  # the trailing defaults too: need_feat follows them
    args = (*args, *(a.default_value for a in schema[len(args) :]))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(getattr(OPS, f"{op}_backward"), (gout, *args, True), test_utils=checks)  # need_feat


def test_compile_forward_and_backward():
    """fullgraph torch.compile over the three ops, forward and backward, equals eager."""
    x = _inputs("hub row", "cpu")
    names = ["feat", "W2", "Wa", "Wsc", "nd", "ms"]

    def step(x):
        agg0 = OPS.film_mean(*op_args("film_mean", x))
        x1 = {**x, "md": x["md"] + agg0}
        agg1 = OPS.edge_film_mean(*op_args("edge_film_mean", x1))
        out = OPS.edge_mlp(*op_args("edge_mlp", {**x, "ns2": x["ns2"] + agg1[:, :6]}))
        return out.square().sum() + agg1.sum()

    eager = torch.autograd.grad(step(x), [x[k] for k in names])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), [x[k] for k in names])
    for g, w in zip(got, eager, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_per_call_backend_inside_compile_must_match():
    """A per-call backend= inside a compiled region that differs from the one in effect is a clear error."""
    if "cpu" not in dispatch.available_backends("cpu"):
        pytest.skip("needs the CPU kernels")
    x = {k: v.detach() for k, v in _inputs("empty rows", "cpu").items()}
    torch._dynamo.reset()
    fn = torch.compile(lambda x: dispatch.film_mean(*op_args("film_mean", x), backend="reference"), fullgraph=True)
    with pytest.raises(Exception, match="use_backend"):
        fn(x)
    with dispatch.use_backend("reference"):
        assert_close_scaled(fn(x), reference.film_mean(*op_args("film_mean", x)))


def test_front_end_signatures():
    """dispatch.<op> has the spec's signature plus backend=."""
    for op in ("film_mean", "edge_mlp", "edge_film_mean"):
        params = list(inspect.signature(getattr(dispatch, op)).parameters)
        assert params == [*inspect.signature(getattr(reference, op)).parameters, "backend"]
