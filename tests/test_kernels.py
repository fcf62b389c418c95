"""Every kernel backend against the pure-PyTorch reference, on random CSR graphs of awkward shapes.

A backend registers itself in nino_fast.ops.dispatch; this suite runs each op through every registered backend
other than 'reference' (CPU extension, CUDA extension, Triton) and compares with the reference in float64 on CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nino_fast.ops import dispatch, reference
from nino_fast.testing import INTERPRET, check, make_inputs, run_op

KERNEL_BACKENDS = [b for b in dispatch.BACKENDS if b != "reference"]
pytestmark = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is built")


def _device(backend):
    if backend == "triton" and INTERPRET:
        return "cpu"  # Triton's interpreter
    return "cuda" if backend in ("cuda", "triton") else "cpu"


OPS = ["film_mean", "edge_mlp", "edge_mlp_plain", "edge_film_mean"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "n_nodes, n_edges, c, d, heavy",
    [
        (0, 0, 5, 8, 0),
        (3, 0, 5, 8, 0),
        (1, 1, 5, 8, 0),
        (7, 1, 3, 5, 0),
        (50, 400, 5, 128, 0),
        (40, 300, 45, 64, 0),
        (33, 257, 7, 33, 0),
        (60, 500, 128, 128, 0),
    ],
)
def test_ops_match_reference(backend, op, n_nodes, n_edges, c, d, heavy):
    inp = make_inputs(n_nodes, n_edges, c, d, seed=n_edges + c)
    check(op, inp, backend)
    check(op, inp, backend, use_table=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["film_mean", "edge_film_mean"])
def test_huge_degree(backend, op):
    if backend == "triton" and INTERPRET:
        pytest.skip("too slow under Triton's interpreter (runs on GPU)")
    inp = make_inputs(20, 100, 5, 64, heavy=100_000, seed=1)
    check(op, inp, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_noncontiguous_inputs(backend, op):
    inp = make_inputs(30, 200, 6, 16, seed=3, noncontig=True)
    assert not inp["feat"].is_contiguous() or inp["feat"].shape[0] <= 1
    check(op, inp, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_deterministic(backend, op):
    inp = make_inputs(40, 3000, 5, 64, heavy=2000, seed=4)
    first = run_op(op, inp, backend)
    assert torch.equal(first, run_op(op, inp, backend))
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = run_op(op, inp, backend)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first, one)  # bitwise identical across thread counts


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_nodes=st.integers(0, 40),
    n_edges=st.integers(0, 300),
    c=st.integers(1, 20),
    d=st.integers(1, 40),
    op=st.sampled_from(OPS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_random_graphs(n_nodes, n_edges, c, d, op, seed):
    if n_nodes == 0:
        n_edges = 0
    inp = make_inputs(n_nodes, n_edges, c, d, seed=seed)
    for backend in KERNEL_BACKENDS:
        check(op, inp, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", [o for o in OPS if o != "edge_mlp_plain"])
def test_bf16_error_bound(backend, op):
    """bf16 inputs: error vs the fp64 reference within 2x of PyTorch's own bf16 computation's error (the CPU
    kernels read them as float32: the same result as float32 copies of the bf16 values, bit for bit)."""
    if backend == "triton" and INTERPRET:
        pytest.skip("too slow under the Triton interpreter (runs on GPU; small cases in test_triton.py)")
    if backend == "cpu":
        inp = make_inputs(20, 300, 5, 24, seed=5)
        rounded = {k: (v.bfloat16().float() if v.is_floating_point() else v) for k, v in inp.items()}
        got = run_op(op, inp, backend, dtype=torch.bfloat16)
        torch.testing.assert_close(got, run_op(op, rounded, backend), rtol=0, atol=0)
    inp = make_inputs(64, 4000, 16, 128, seed=5)
    exact = run_op(op, {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}, "reference")
    torch_bf16 = run_op(op, inp, "reference", dtype=torch.bfloat16)
    got = run_op(op, inp, backend, dtype=torch.bfloat16)
    err_torch = (torch_bf16 - exact).abs().max().item()
    err_ours = (got - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_float64_runs_the_spec(backend, op):
    """float64 inputs are computed in float64 on every backend (the kernels compute in float32): the op's result
    is the reference's, bit for bit."""
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in make_inputs(20, 300, 5, 24, seed=6).items()}
    got = run_op(op, inp, backend)
    torch.testing.assert_close(got, run_op(op, inp, "reference"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d_out", [1, 3, 4, 5])
@pytest.mark.parametrize("plain", [True, False])
def test_edge_mlp_narrow_output(backend, d_out, plain):
    """A few outputs per edge (the model's head): the CPU kernel runs plain ones (no node_src2/dst2, no act_out) as
    dot products. Each output is judged against the magnitude of the terms summed into it (a one-value output can
    cancel to near zero, so a check relative to the largest output would be meaningless); bitwise across threads."""
    a = make_inputs(60, 2500, 7, 40, d_out=d_out, heavy=900, seed=d_out)
    a64 = make_inputs(60, 2500, 7, 40, d_out=d_out, heavy=900, seed=d_out, dtype=torch.float64)
    extra = () if plain else ("ns2", "nd2")

    def args(x):
        keys = ("feat", "src", "dst", "Wa", "ba", "Wb", "bb", "etype", "table", "ns", "nd")
        return tuple(x[k] for k in keys) + (tuple(x[k] for k in extra) or (None, None))

    got = dispatch.edge_mlp(*args(a), act_out=not plain, backend=backend)
    want = reference.edge_mlp(*args(a64), act_out=not plain)
    # the same maths on absolute values bounds every term (|silu(x)| <= |x|)
    x = a64
    h = (x["feat"].abs() @ x["Wa"].abs().T + x["ba"].abs() + x["table"].abs()[x["etype"]]).add_(
        x["ns"].abs()[x["src"].long()] + x["nd"].abs()[x["dst"].long()]
    )
    terms = h @ x["Wb"].abs().T + x["bb"].abs()
    if not plain:
        terms = terms + x["ns2"].abs()[x["src"].long()] + x["nd2"].abs()[x["dst"].long()]
    assert got.shape == want.shape == (a["feat"].shape[0], d_out)
    assert ((got.double() - want).abs() <= 1e-5 * terms).all()
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = dispatch.edge_mlp(*args(a), act_out=not plain, backend=backend)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(got, one)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "n_nodes, n_edges, heavy, d_c, d_d, act_out",
    [
        (0, 0, 0, 16, 1, False),  # no edges
        (1, 1, 0, 16, 1, False),  # one edge
        (60, 2500, 900, 40, 1, False),  # a hub row; the head's shape: a one-value dot-product layer d
        (60, 700, 0, 33, 3, True),  # act_out: layer d as a GEMM
        (30, 500, 0, 24, None, False),  # layer c last, 24 wide
        (30, 500, 0, 3, None, False),  # layer c last and 3 wide: a dot product
    ],
)
def test_edge_mlp_readout(backend, n_nodes, n_edges, heavy, d_c, d_d, act_out):
    """edge_mlp's readout layers (W_c, then W_d) against the float64 reference; on the CPU, the one fused call is
    bitwise the two-layer call with act_out followed by a second call on its output, with 1 and 2 threads."""
    a = make_inputs(n_nodes, n_edges, 7, 40, d_out=24, heavy=heavy, seed=n_edges + d_c)
    a64 = make_inputs(n_nodes, n_edges, 7, 40, d_out=24, heavy=heavy, seed=n_edges + d_c, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    layers64 = [torch.randn(d_c, 24, generator=gen, dtype=torch.float64) * 0.3, torch.randn(d_c, generator=gen)]
    layers64 += [None, None] if d_d is None else [torch.randn(d_d, d_c, generator=gen, dtype=torch.float64) * 0.3]
    layers64 += [] if d_d is None else [torch.randn(d_d, generator=gen, dtype=torch.float64)]
    dev = _device(backend)
    layers = [None if t is None else t.float().to(dev) for t in layers64]
    keys = ("feat", "src", "dst", "Wa", "ba", "Wb", "bb", "etype", "table", "ns", "nd", "ns2", "nd2")
    x = {k: a[k].to(dev) for k in keys}

    def run():
        return dispatch.edge_mlp(*(x[k] for k in keys), act_out, *layers, backend=backend)

    got = run()
    want = reference.edge_mlp(*(a64[k] for k in keys), act_out, *(None if t is None else t.double() for t in layers64))
    assert got.shape == want.shape == (n_edges + heavy, d_d or d_c) and got.dtype == torch.float32
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5 * scale, rtol=1e-5)
    if backend != "cpu":
        return
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, one)
    if d_d is not None:  # layers c and d are a two-layer edge MLP on silu(z): the kernel's own SiLU from act_out
        h = dispatch.edge_mlp(*(x[k] for k in keys), True, backend="cpu")
        two = dispatch.edge_mlp(h, x["src"], x["dst"], *layers, act_out=act_out, backend="cpu")
        assert torch.equal(got, two)


@pytest.mark.skipif("cpu" not in dispatch.BACKENDS, reason="needs the CPU extension")
def test_cpu_output_pool_survives_release():
    """Large CPU outputs come from a buffer pool (csrc/cpu/out_pool.h): releasing the pool while an output is alive
    must not free it, and a later call of the same size (reusing the returned buffer) must compute afresh."""
    from nino_fast._extension import release_cpu_buffers

    n, e, c, d = 3000, 12000, 5, 128  # (E, D) fp32 output of 6 MB: pooled
    a = make_inputs(n, e, c, d, seed=3, dtype=torch.float32)
    args = (a["feat"], a["src"], a["dst"], a["Wa"], a["ba"], a["Wb"], a["bb"])
    first = dispatch.edge_mlp(*args, backend="cpu")
    keep = first.clone()
    release_cpu_buffers()
    assert torch.equal(first, keep)
    del first
    again = dispatch.edge_mlp(*args, backend="cpu")  # likely the same buffer, back from the pool
    assert torch.equal(again, keep)
    torch.testing.assert_close(again, reference.edge_mlp(*args), rtol=1e-5, atol=1e-5)
    release_cpu_buffers()


@pytest.mark.skipif("cpu" not in dispatch.BACKENDS, reason="needs the CPU extension")
def test_cpu_output_pool_reuses_larger_buffers():
    """A smaller output (a chunked loop's last chunk, the next tile's) takes a cached larger buffer instead of
    caching one more per size, and is computed afresh in it."""
    from nino_fast._extension import release_cpu_buffers

    release_cpu_buffers()
    n, e, c, d = 3000, 12000, 5, 128
    a = make_inputs(n, e, c, d, seed=4, dtype=torch.float32)
    args = (a["feat"], a["src"], a["dst"], a["Wa"], a["ba"], a["Wb"], a["bb"])
    big = dispatch.edge_mlp(*args, backend="cpu")  # (12000, 128) fp32: 6 MB, pooled
    ptr = big.data_ptr()
    del big  # back to the pool
    part = (args[0][:8000], args[1][:8000], args[2][:8000], *args[3:])
    small = dispatch.edge_mlp(*part, backend="cpu")  # 4 MB: served by the cached 6 MB buffer
    assert small.data_ptr() == ptr
    torch.testing.assert_close(small, reference.edge_mlp(*part), rtol=1e-5, atol=1e-5)
    release_cpu_buffers()


@pytest.mark.skipif("cpu" not in dispatch.BACKENDS, reason="needs the CPU extension")
def test_cpu_output_pool_keeps_a_training_steps_buffers_until_released():
    """Between training steps of an nn layer the freed outputs and input gradients stay cached (the next step asks
    for the same sizes and reuses them: no fresh pages), within the default cap of min(2 GiB, RAM / 8), until
    release_cpu_buffers()."""
    import os

    import nino_fast
    from nino_fast.nn import EdgeUpdate

    nino_fast.release_cpu_buffers()
    cached, cap = torch.ops.nino_fast._cpu_pool_stats()
    assert cached == 0
    if "NINO_FAST_CPU_POOL_MB" not in os.environ:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert cap == min(2048, (ram >> 20) // 8) << 20
    if cap < 64 << 20:
        pytest.skip("the buffer cache is smaller than this test's two 4 MiB buffers")
    gen = torch.Generator().manual_seed(0)
    n, e, d = 500, 8192, 128  # (E, D) fp32: 4 MiB per buffer
    layer = EdgeUpdate(d, d, d)
    x = torch.randn(n, d, generator=gen)
    edge_index = torch.randint(0, n, (2, e), generator=gen)
    attr = torch.randn(e, d, generator=gen).requires_grad_()
    grad_out = torch.randn(e, d, generator=gen)
    held = []
    for _ in range(3):
        attr.grad = None  # the last step's input gradient: back to the cache
        out = layer(x, edge_index, attr)
        out.backward(grad_out)
        del out  # cached; attr.grad holds the other buffer
        held.append(torch.ops.nino_fast._cpu_pool_stats()[0])
    assert held[0] >= e * d * 4
    assert held[1] == held[2] == held[0]  # the same buffers go round, not one more per step
    nino_fast.release_cpu_buffers()
    assert torch.ops.nino_fast._cpu_pool_stats()[0] == 0


def test_cpu_silu_and_its_derivative_to_a_few_ulp():
    """The CPU kernels' SiLU (their own exp: a polynomial and exponent scaling) against float64 over the float range
    that matters, through edge_mlp with identity weights (``out = silu(x)``; its backward gives ``silu'(x)``):
    within 3 ulp of the exact value's size (or 1e-36 absolute, below which the exact SiLU underflows to 0), and the
    saturated ends (|x| up to 1e30, where the exp's argument is clamped) equal to ``x`` on the right and 0 on the
    left, never inf or NaN."""
    if "cpu" not in dispatch.BACKENDS:
        pytest.skip("the CPU extension is not built")
    x = torch.cat([torch.linspace(-100, 100, 400_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 3e38])])
    x = x.float()
    e = x.numel()
    zeros = torch.zeros(e, dtype=torch.int32)
    one, zero = torch.ones(1, 1), torch.zeros(1)
    feat = x[:, None].clone().requires_grad_(True)
    out = dispatch.edge_mlp(feat, zeros, zeros, one, zero, one, zero, backend="cpu")[:, 0]
    (grad,) = torch.autograd.grad(out, feat, torch.ones(e))
    xd = x.double()
    sig = torch.sigmoid(xd)
    # the derivative sig (1 + x (1 - sig)) is measured against its terms' size, (1 + |x|) sig: where they cancel
    # (x near -1.28) a few ulp of them is the float32 formula's own rounding
    cases = ((out, xd * sig, (xd * sig).abs()), (grad[:, 0], sig * (1 + xd * (1 - sig)), (1 + xd.abs()) * sig))
    for got, want, scale in cases:
        assert torch.isfinite(got).all()
        err = (got.double() - want).abs() - 3 * torch.finfo(torch.float32).eps * scale
        assert err.max() <= 1e-36
    assert out[-3] == x[-3] and out[-1] == x[-1] and out[-2] == 0  # 1e30, -1e30, 3e38


@pytest.mark.skipif("cpu" not in dispatch.BACKENDS, reason="needs the CPU extension")
@pytest.mark.parametrize("act_out", [False, True])
def test_cpu_edge_mlp_output_past_the_caches(act_out):
    """An edge_mlp output over 32 MB is written with non-temporal stores: the same values as the cached stores of
    two calls on its halves (each edge's row is computed on its own), and the reference's to float32 accuracy."""
    n_edges, d = 70_000, 128  # 35.8 MB of output, 17.9 MB per half
    a = make_inputs(200, n_edges, 5, d, seed=7)
    a64 = make_inputs(200, n_edges, 5, d, seed=7, dtype=torch.float64)
    keys = ("feat", "src", "dst", "Wa", "ba", "Wb", "bb", "etype", "table", "ns", "nd", "ns2", "nd2")
    full = dispatch.edge_mlp(*(a[k] for k in keys), act_out, backend="cpu")
    assert full.numel() * full.element_size() > 32 << 20
    half = n_edges // 2
    parts = [
        dispatch.edge_mlp(
            *(a[k][sl] if k in ("feat", "src", "dst", "etype") else a[k] for k in keys), act_out, backend="cpu"
        )
        for sl in (slice(0, half), slice(half, None))
    ]
    assert torch.equal(full, torch.cat(parts))
    want = reference.edge_mlp(*(a64[k] for k in keys), act_out)
    torch.testing.assert_close(full.double(), want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-5)
