"""Analytic backward registered on the fused ops (nino_fast.ops.backward): gradcheck in float64 on small random CSR
graphs (empty rows, a single edge, no edges), and gradients equal to autograd through the reference ops."""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import dispatch, reference

# gradcheck needs a float64-exact forward: the reference's. (The kernels accept float64 but accumulate in float32,
# too coarse for finite differences.) The backward checked is the same code whatever the forward's backend; the
# float32 test below runs it after every available kernel.
F64_BACKENDS = ["reference"]
GRAPHS = [(3, 0), (1, 1), (4, 1), (6, 15), (9, 30)]  # (nodes, edges): no edges, one edge, empty rows


def make(n_nodes, n_edges, c=3, d=4, d_out=5, n_types=3, seed=0, dtype=torch.float64, hub=0, weight_scale=0.7):
    """Random inputs of the ops of ``call`` on a destination-sorted CSR graph of ``n_edges`` random edges plus
    ``hub`` edges into row ``n_nodes // 2``; weight matrices drawn with std ``weight_scale``, the rest with 0.7."""
    gen = torch.Generator().manual_seed(seed)
    dst = torch.cat((torch.randint(0, n_nodes, (n_edges,), generator=gen), torch.full((hub,), n_nodes // 2)))
    dst = dst.sort().values
    m = dst.numel()
    src = torch.randint(0, n_nodes, (m,), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n_nodes).cumsum(0)

    def r(*shape, scale=0.7):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    w = weight_scale
    return dict(
        rowptr=rowptr,
        src=src,
        dst=dst.to(torch.int32),
        etype=torch.randint(0, n_types, (m,), generator=gen),
        feat=r(m, c),
        W2=r(2 * d, c, scale=w),
        b2=r(2 * d),
        T2=r(n_types, 2 * d),
        Wa=r(d, c, scale=w),
        ba=r(d),
        Ta=r(n_types, d),
        Wb=r(d_out, d, scale=w),
        bb=r(d_out),
        Wsc=r(d, d, scale=w),
        bsc=r(d),
        Wsh=r(d, d, scale=w),
        bsh=r(d),
        nd=r(n_nodes, d),
        ns=r(n_nodes, d),
        nd2=r(n_nodes, d_out),
        ns2=r(n_nodes, d_out),
        md=r(n_nodes, d),
        ms=r(n_nodes, d),
    )


def inputs(op, table=True, gathers=True, act_out=True) -> list[str]:
    """Names of the differentiable inputs ``call`` uses."""
    if op == "film_mean":
        return ["feat", "nd", "ns", "W2", "b2"] + (["T2"] if table else [])
    if op == "edge_mlp":
        return ["feat", "Wa", "ba", "Wb", "bb"] + (["Ta"] if table else []) + (["ns", "nd", "ns2", "nd2"] * gathers)
    return ["feat", "Wa", "ba"] + (["Ta"] if table else []) + ["ns", "nd", "md", "ms", "Wsc", "bsc", "Wsh", "bsh"]


def call(op, impl, x, backend=None, table=True, gathers=True, act_out=True):
    """``op`` through ``impl`` (nino_fast.ops.dispatch or reference) on the tensors of ``x``."""
    kw = {} if impl is reference else {"backend": backend}
    et = x["etype"] if table else None
    if op == "film_mean":
        t = x["T2"] if table else None
        return impl.film_mean(x["feat"], x["rowptr"], x["src"], x["nd"], x["ns"], x["W2"], x["b2"], et, t, **kw)
    t = x["Ta"] if table else None
    if op == "edge_mlp":
        g = (x["ns"], x["nd"], x["ns2"], x["nd2"]) if gathers else (None,) * 4
        w = (x["Wa"], x["ba"], x["Wb"], x["bb"])
        return impl.edge_mlp(x["feat"], x["src"], x["dst"], *w, et, t, *g, act_out=act_out, **kw)
    rest = (x["ns"], x["nd"], x["md"], x["ms"], x["Wsc"], x["bsc"], x["Wsh"], x["bsh"])
    return impl.edge_film_mean(x["feat"], x["rowptr"], x["src"], x["Wa"], x["ba"], et, t, *rest, **kw)


CASES = [
    ("film_mean", dict(table=True)),
    ("film_mean", dict(table=False)),
    ("edge_mlp", dict(table=True, gathers=True, act_out=True)),
    ("edge_mlp", dict(table=False, gathers=False, act_out=False)),
    ("edge_mlp", dict(table=True, gathers=True, act_out=False)),
    ("edge_film_mean", dict(table=True)),
    ("edge_film_mean", dict(table=False)),
]


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
