"""CUDA-specific checks of the fused kernels (the shared suite test_kernels.py covers the basic contract).

What only the CUDA backend has: 64-edge tiles whose rows are stitched across warps and tiles (degrees around
the tile size, runs of empty rows, one huge row), the 3xTF32 fp32 path, mixed dtypes (16-bit features with
fp32 weights and node tables, as the folded plan calls it), unaligned node tables (scalar gathers), no host
synchronisation (CUDA-graph capture), and the errors of the host-side checks.
"""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import dispatch
from nino_fast.testing import check, make_inputs, run_op

from conftest import needs_cuda_ext

pytestmark = [
    needs_cuda_ext,
    pytest.mark.skipif("cuda" not in dispatch.BACKENDS, reason="needs the CUDA kernels of nino_fast._C"),
]

OPS = ["film_mean", "edge_mlp", "edge_mlp_plain", "edge_film_mean"]
TILE = 64  # edges per tile in csrc/cuda (kTileE)


def graph_from_degrees(degrees):
    """CSR from a list of in-degrees (zeros allowed), with random sources."""
    deg = torch.tensor(degrees, dtype=torch.int64)
    n = deg.numel()
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = deg.cumsum(0)
    e = int(rowptr[-1])
    dst = torch.repeat_interleave(torch.arange(n), deg).to(torch.int32)
    src = torch.randint(0, n, (e,), dtype=torch.int32)
    return rowptr, src, dst


def inputs_for(rowptr, src, dst, c, d, d_out=None, n_types=15):
    """make_inputs' tensors on a given graph."""
    n, e = rowptr.numel() - 1, int(rowptr[-1])
    base = make_inputs(n, e, c, d, d_out=d_out, n_types=n_types, seed=11)
    base.update(rowptr=rowptr, src=src, dst=dst)
    return base


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("d, c", [(128, 5), (128, 45), (33, 7), (64, 128)])
def test_tile_and_warp_borders(op, d, c):
    """Rows ending at, just before and just after warp (8) and tile (64) borders; runs of empty rows."""
    degrees = [1, 7, 8, 9, 0, 0, 63, 64, 65, 0, 127, 128, 129, 3, 0, 0, 0, 200, 1, 1, 1, 64 * 5, 2, 0]
    inp = inputs_for(*graph_from_degrees(degrees), c, d)
    check(op, inp, "cuda")
    check(op, inp, "cuda", use_table=False)


@pytest.mark.parametrize("op", ["film_mean", "edge_film_mean"])
@pytest.mark.parametrize("offset", [0, 1, TILE - 1])
def test_huge_row_between_empty_rows(op, offset):
    """A 100k-edge row (~1600 tiles, summed by the finalize kernel) at different tile offsets."""
    degrees = [offset, 0, 0, 100_000, 0, 5, 0]
    inp = inputs_for(*graph_from_degrees(degrees), 5, 128)
    check(op, inp, "cuda")


@pytest.mark.parametrize("op", OPS)
def test_many_short_rows(op):
    """Mostly empty and single-edge rows: many row changes inside every warp."""
    gen = torch.Generator().manual_seed(0)
    degrees = torch.randint(0, 3, (5000,), generator=gen).tolist()
    inp = inputs_for(*graph_from_degrees(degrees), 5, 128)
    check(op, inp, "cuda")


@pytest.mark.parametrize("op", OPS)
def test_deterministic_large(op):
    """Bitwise identical results run to run, on a graph with many tiles and a heavy row (fp32 and bf16)."""
    inp = make_inputs(2000, 200_000, 45, 128, heavy=30_000, seed=2)
    for dtype in (torch.float32, torch.bfloat16):
        first = run_op(op, inp, "cuda", dtype=dtype)
        for _ in range(2):
            assert torch.equal(first, run_op(op, inp, "cuda", dtype=dtype))


def _errors(op, inp, dtype, mixed):
    """(error of the CUDA kernel, error of PyTorch in ``dtype``) against the fp64 reference."""
    exact = run_op(op, {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}, "reference")
    torch_low = run_op(op, inp, "reference", dtype=dtype)
    if mixed:  # 16-bit features only; weights, biases, tables and node terms stay fp32
        low = dict(inp, feat=inp["feat"].to(dtype))
        got = run_op(op, low, "cuda")
    else:
        got = run_op(op, inp, "cuda", dtype=dtype)
    return (got - exact).abs().max().item(), (torch_low - exact).abs().max().item()


@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_film_mean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True], ids=["all-low", "low-feat-only"])
def test_low_precision_error_bound(op, dtype, mixed):
    """16-bit inputs: error vs fp64 within 2x PyTorch's own error in that dtype (fp32 accumulation inside)."""
    inp = make_inputs(64, 4000, 45, 128, seed=5)
    err_ours, err_torch = _errors(op, inp, dtype, mixed)
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.parametrize("op", OPS)
def test_float64_inputs_run_in_fp32(op):
    inp = {k: (v.double() if v.is_floating_point() else v) for k, v in make_inputs(40, 500, 9, 32, seed=6).items()}
    check(op, inp, "cuda")


@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_film_mean"])
def test_unaligned_node_tables(op):
    """Node tables whose data pointer is not 16-byte aligned take the scalar-gather path."""
    inp = make_inputs(30, 300, 5, 64, seed=8)
    a = _cuda(inp)
    for key in ("nd", "ns", "nd2", "ns2", "md", "ms"):
        buf = torch.empty(a[key].numel() + 1, dtype=a[key].dtype, device="cuda")
        view = buf[1:].view_as(a[key])  # contiguous, one element past an aligned allocation
        view.copy_(a[key])
        a[key] = view
    got = getattr(torch.ops.nino_fast, op)(*_args(op, a)).double().cpu()
    want = run_op(op, {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}, "reference")
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize(
    "d_out, c, dtype",
    [(1, 128, torch.float32), (9, 128, torch.float32), (9, 128, torch.bfloat16), (3, 5, torch.float16)],
)
def test_edge_mlp_head_shapes(d_out, c, dtype):
    """The head: a tiny second GEMM (D_out = F), D_out not a multiple of 4, no gathers, no table."""
    inp = make_inputs(50, 3000, c, 128, d_out=d_out, seed=9)
    if dtype == torch.float32:
        check("edge_mlp_plain", inp, "cuda")
    else:
        exact = run_op(
            "edge_mlp_plain",
            {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()},
            "reference",
        )
        got = run_op("edge_mlp_plain", dict(inp, feat=inp["feat"].to(dtype)), "cuda")
        torch_low = run_op("edge_mlp_plain", inp, "reference", dtype=dtype)
        assert (got - exact).abs().max() <= 2 * (torch_low - exact).abs().max() + 1e-6


def test_cuda_graph_capture():
    """No host synchronisation inside the ops: they can be captured in a CUDA graph and replayed."""
    inp = _cuda(make_inputs(40, 2000, 5, 64, seed=10))

    def step():
        a = inp
        agg = dispatch.film_mean(
            a["feat"],
            a["rowptr"],
            a["src"],
            a["nd"],
            a["ns"],
            a["W2"],
            a["b2"],
            a["etype"],
            a["table2"],
            backend="cuda",
        )
        agg1 = dispatch.edge_film_mean(
            a["feat"],
            a["rowptr"],
            a["src"],
            a["Wa"],
            a["ba"],
            a["etype"],
            a["table"],
            a["ns"],
            a["nd"],
            a["md"] + agg,
            a["ms"],
            a["Wsc"],
            a["bsc"],
            a["Wsh"],
            a["bsh"],
            backend="cuda",
        )
        return dispatch.edge_mlp(
            a["feat"],
            a["src"],
            a["dst"],
            a["Wa"],
            a["ba"],
            a["Wb"],
            a["bb"],
            a["etype"],
            a["table"],
            a["ns"],
            a["nd"],
            agg1,
            a["nd2"],
            act_out=True,
            backend="cuda",
        )

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def _cuda(inp):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _args(op, a):
    if op == "film_mean":
        return (a["feat"], a["rowptr"], a["src"], a["nd"], a["ns"], a["W2"], a["b2"], a["etype"], a["table2"])
    if op == "edge_film_mean":
        return (
            a["feat"],
            a["rowptr"],
            a["src"],
            a["Wa"],
            a["ba"],
            a["etype"],
            a["table"],
            a["ns"],
            a["nd"],
            a["md"],
            a["ms"],
            a["Wsc"],
            a["bsc"],
            a["Wsh"],
            a["bsh"],
        )
    return (
        a["feat"],
        a["src"],
        a["dst"],
        a["Wa"],
        a["ba"],
        a["Wb"],
        a["bb"],
        a["etype"],
        a["table"],
        a["ns"],
        a["nd"],
        a["ns2"],
        a["nd2"],
        True,
    )


@pytest.mark.parametrize("op", ["film_mean", "edge_mlp", "edge_film_mean"])
@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda a: a.update(src=a["src"].cpu()), r"src must be a CUDA tensor"),
        (lambda a: a.update(src=a["src"].long()), r"src must be Int"),
        (lambda a: a.update(etype=None), r"etype and type_table go together"),
        (
            lambda a: a.update(feat=a["feat"][:, :3]),
            r"must be \(D_h, C\) with C=3|must be \(2\*D, C\) with C=3",
        ),
    ],
)
def test_errors_name_op_and_argument(op, breakage, match):
    a = _cuda(make_inputs(10, 50, 5, 16, seed=12))
    breakage(a)
    with pytest.raises(RuntimeError, match=rf"nino_fast::{op}: .*({match})"):
        getattr(torch.ops.nino_fast, op)(*_args(op, a))


def test_too_wide_layer_is_a_clear_error():
    a = _cuda(make_inputs(10, 50, 5, 160, seed=13))
    with pytest.raises(RuntimeError, match=r"nino_fast::film_mean: the CUDA kernel supports D .*<= 128, got 160"):
        torch.ops.nino_fast.film_mean(*_args("film_mean", a))


def test_outputs_are_fp32_and_fresh():
    a = _cuda(make_inputs(10, 50, 5, 16, seed=14))
    a16 = {k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
    for op in ("film_mean", "edge_mlp", "edge_film_mean"):
        out = getattr(torch.ops.nino_fast, op)(*_args(op, a16))
        assert out.dtype == torch.float32 and out.is_cuda and out.is_contiguous()
