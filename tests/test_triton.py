"""Triton-only paths the shared suite cannot reach cheaply: the long-row split at a tiny CHUNK (window slots,
rows on window boundaries, empty rows between long rows), low-precision dots, input errors, and the custom
ops' registration (torch.library.opcheck). Runs on a GPU, or on CPU under TRITON_INTERPRET=1 (small shapes).
"""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import dispatch
from nino_fast.ops import reference as ref
from nino_fast.testing import INTERPRET, make_inputs, run_op

pytestmark = pytest.mark.skipif(
    "triton" not in dispatch.BACKENDS, reason="needs triton and a GPU (or TRITON_INTERPRET=1)"
)
DEV = "cpu" if INTERPRET else "cuda"


def _kernels():
    from nino_fast.ops import triton_backend  # noqa: F401  (makes nino_fast.triton_kernels importable)
    from nino_fast.triton_kernels import edge_film_mean, edge_mlp, film_mean

    return film_mean, edge_mlp, edge_film_mean


def graph_with_degrees(degrees, seed=0):
    """CSR with the given in-degrees (row order) and random sources."""
    gen = torch.Generator().manual_seed(seed)
    deg = torch.tensor(degrees, dtype=torch.int64)
    rowptr = torch.zeros(len(degrees) + 1, dtype=torch.int64)
    rowptr[1:] = deg.cumsum(0)
    e = int(rowptr[-1])
    src = torch.randint(0, len(degrees), (e,), generator=gen).to(torch.int32)
    return rowptr, src


def _inputs_for(rowptr, src, c, d, seed=0, dtype=torch.float64):
    n, e = rowptr.numel() - 1, src.numel()
    base = make_inputs(n, e, c, d, seed=seed, dtype=dtype)
    base.update(rowptr=rowptr, src=src, dst=ref.csr_dst(rowptr).to(torch.int32))
    return base


def _film(a, dev, dtype=torch.float32, table=True):
    t = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in a.items()}
    et, tab2, tab = (t["etype"], t["table2"], t["table"]) if table else (None, None, None)
    return t, et, tab2, tab


# Degrees around CHUNK = 32: long rows on and off window boundaries, two long rows sharing a window, empty
# rows between long rows, a long row covering whole windows, short rows of exactly CHUNK edges.
DEGREES = [0, 32, 33, 0, 0, 64, 1, 95, 31, 32, 200, 0, 40, 3, 0, 129, 7]


@pytest.mark.parametrize(
    "op, table, chunk",
    [
        ("film_mean", True, 32),
        ("film_mean", False, 64),
        ("edge_film_mean", True, 32),
        ("edge_film_mean", False, 64),
    ],
)
def test_long_rows_split(op, table, chunk):
    film_mean, _, edge_film_mean = _kernels()
    rowptr, src = graph_with_degrees(DEGREES, seed=chunk)
    a = _inputs_for(rowptr, src, 5, 40, seed=1)  # D = 40: a full and a ragged 32-column chunk of h
    want = run_op(op, a, "reference", use_table=table)
    t, et, tab2, tab = _film(a, DEV, table=table)

    def call():
        if op == "film_mean":
            return film_mean.film_mean(
                t["feat"],
                t["rowptr"],
                t["src"],
                t["nd"],
                t["ns"],
                t["W2"],
                t["b2"],
                et,
                tab2,
                block_e=16,
                chunk=chunk,
            )
        return edge_film_mean.edge_film_mean(
            t["feat"],
            t["rowptr"],
            t["src"],
            t["Wa"],
            t["ba"],
            et,
            tab,
            t["ns"],
            t["nd"],
            t["md"],
            t["ms"],
            t["Wsc"],
            t["bsc"],
            t["Wsh"],
            t["bsh"],
            block_e=16,
            chunk=chunk,
        )

    got = call()
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got, call())  # deterministic: the same split sums in the same order


def test_many_types_gathers_shift_table():
    """T > 32 types: the shift-half table is gathered per edge instead of a type histogram."""
    film_mean, _, _ = _kernels()
    a = make_inputs(12, 90, 5, 16, n_types=40, seed=2)
    want = run_op("film_mean", a, "reference")
    t, et, tab2, _ = _film(a, DEV)
    got = film_mean.film_mean(t["feat"], t["rowptr"], t["src"], t["nd"], t["ns"], t["W2"], t["b2"], et, tab2)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("d_out, c", [(1, 128), (9, 128), (128, 5)])
def test_edge_mlp_head_shapes(d_out, c):
    """The output head: weight_b with 1 or 9 rows (padded to a 16-wide tile), C = 128 in two K steps."""
    a = make_inputs(30, 200, c, 128, d_out=d_out, seed=d_out)
    want = run_op(
        "edge_mlp_plain", {k: (v.double() if v.is_floating_point() else v) for k, v in a.items()}, "reference"
    )
    got = run_op("edge_mlp_plain", a, "triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_mlp_plain", "edge_film_mean"])
def test_low_precision_error_bound(op, dtype):
    """Low-precision inputs: error vs float64 within 2x of PyTorch's own error in that dtype (small shapes;
    the interpreter rounds the dot operands to the dtype and multiplies in fp32, as the tensor cores do)."""
    inp = make_inputs(24, 400, 16, 64, seed=6)
    exact = run_op(op, {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}, "reference")
    err_torch = (run_op(op, inp, "reference", dtype=dtype) - exact).abs().max().item()
    err_ours = (run_op(op, inp, "triton", dtype=dtype) - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_input_errors_name_op_and_argument():
    a = make_inputs(5, 20, 5, 8, seed=0)
    t, et, tab2, tab = _film(a, DEV)
    with pytest.raises(ValueError, match=r"film_mean: weight must have shape \(16, 5\)"):
        dispatch.film_mean(
            t["feat"],
            t["rowptr"],
            t["src"],
            t["nd"],
            t["ns"],
            t["W2"][:, :4],
            t["b2"],
            et,
            tab2,
            backend="triton",
        )
    with pytest.raises(TypeError, match="edge_mlp: src must be int32 or int64"):
        dispatch.edge_mlp(t["feat"], t["src"].float(), t["dst"], t["Wa"], t["ba"], t["Wb"], t["bb"], backend="triton")
    with pytest.raises(ValueError, match="edge_mlp: node_src and node_dst must be given together"):
        dispatch.edge_mlp(
            t["feat"],
            t["src"],
            t["dst"],
            t["Wa"],
            t["ba"],
            t["Wb"],
            t["bb"],
            node_src=t["ns"],
            backend="triton",
        )
    with pytest.raises(TypeError, match="edge_film_mean: msg_src must be float32, bfloat16 or float16"):
        dispatch.edge_film_mean(
            t["feat"],
            t["rowptr"],
            t["src"],
            t["Wa"],
            t["ba"],
            et,
            tab,
            t["ns"],
            t["nd"],
            t["md"],
            t["ms"].double(),
            t["Wsc"],
            t["bsc"],
            t["Wsh"],
            t["bsh"],
            backend="triton",
        )


def test_opcheck_custom_ops():
    """Schema, fake (meta) implementation, autograd and dispatcher registration of the three ops, with the Triton
    implementation selected (the same op names as every other backend)."""
    a = make_inputs(6, 25, 5, 16, seed=3)
    t, et, tab2, tab = _film(a, DEV)
    ops = torch.ops.nino_fast
    cases = [
        (
            ops.film_mean,
            (t["feat"], t["rowptr"], t["src"], t["nd"], t["ns"], t["W2"], t["b2"], et, tab2),
        ),
        (
            ops.edge_mlp,
            (
                t["feat"],
                t["src"],
                t["dst"],
                t["Wa"],
                t["ba"],
                t["Wb"],
                t["bb"],
                et,
                tab,
                t["ns"],
                t["nd"],
                t["ns2"],
                t["nd2"],
                True,
            ),
        ),
        (
            ops.edge_mlp,
            (
                t["feat"],
                t["src"],
                t["dst"],
                t["Wa"],
                t["ba"],
                t["Wb"],
                t["bb"],
                None,
                None,
                None,
                None,
                None,
                None,
                False,
            ),
        ),
        (
            ops.edge_film_mean,
            (
                t["feat"],
                t["rowptr"],
                t["src"],
                t["Wa"],
                t["ba"],
                et,
                tab,
                t["ns"],
                t["nd"],
                t["md"],
                t["ms"],
                t["Wsc"],
                t["bsc"],
                t["Wsh"],
                t["bsh"],
            ),
        ),
    ]
    with dispatch.use_backend("triton"):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_nowcast_bfloat16_edge_features():
    """``nowcast(edge_dtype=torch.bfloat16)`` through the Triton kernels: bf16 edge features and head states,
    predicted deltas within bf16 accuracy of the float32 step (on a tiny ConvNet graph)."""
    from nino_fast import NiNoModel, build_graph

    from golden import ckpt

    shapes = [("c1.weight", (8, 3, 3, 3)), ("c1.bias", (8,)), ("c2.weight", (6, 8, 3, 3)), ("fc.weight", (4, 6))]
    graph = build_graph(shapes, lpe=8)
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(graph.num_params, 1, generator=gen) * 0.1 + torch.randn(graph.num_params, 5, generator=gen)
    states = states.cumsum(1) * 1e-2
    nino = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt")).to(DEV)
    full = nino.nowcast(graph, states, 5, backend="triton")
    half = nino.nowcast(graph, states, 5, backend="triton", edge_dtype=torch.bfloat16)
    d_full, d_half = full - states[:, -1], half - states[:, -1]
    err = ((d_half - d_full).abs().max() / d_full.abs().max()).item()
    print(f"bf16 edge features: max delta error {err:.2e} of the max delta")
    assert 0 < err < 3e-2  # not the float32 step (bf16 rounding happened), but close to it
