"""edge_mlp: two GEMMs with gathers and SiLU over an edge list (spec: ops/reference.py).

    h_e   = silu(W_a e_e + b_a (+ table[etype_e]) (+ node_src[src_e] + node_dst[dst_e]))     W_a: (DH, C)
    out_e = W_b h_e + b_b (+ node_src2[src_e] + node_dst2[dst_e]), then silu if act_out    W_b: (DO, DH)

No reduction: one program per BLOCK_E consecutive edges. h is built BLOCK_KH columns at a time (the first
product over C in BLOCK_K steps, bias / table / gathers, SiLU) and each chunk goes straight into the second
product, accumulated over the chunks in registers: every dot has K <= 32 and h never leaves the program. DO
may be tiny (the output head: 1 or 9 columns), padded to a 16-wide tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils
from .tiles import mm, mm_k, rows_at

OP = "edge_mlp"


@triton.jit
def edge_mlp_kernel(
    feat,
    src_ptr,
    dst_ptr,
    edge,
    wb,
    bb_ptr,
    ns2,
    nd2,
    out,
    E,
    C,
    DH,
    DO,
    HAS_TAB: tl.constexpr,
    HAS_NODE: tl.constexpr,
    HAS_NODE2: tl.constexpr,
    ACT_OUT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_O: tl.constexpr,
    DOT: tl.constexpr,
):
    """edge: the edge layer's ``(wa, ba_ptr, et_ptr, tab, ns, nd)`` (``utils.edge_layer``); feat, wa, wb:
    ``(ptr, stride_row, stride_col)``; tab, ns, nd, ns2, nd2, out: ``(ptr, stride_row)``."""
    wa, ba_ptr, et_ptr, tab, ns, nd = edge
    wb_ptr, stride_wbo, stride_wbi = wb
    out_ptr, stride_out = out
    pid = tl.program_id(0)
    e_idx = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    offs_j = tl.arange(0, BLOCK_KH)
    offs_o = tl.arange(0, BLOCK_O)
    o_mask = offs_o < DO
    eo_mask = e_mask[:, None] & o_mask[None, :]
    if HAS_TAB:
        t = tl.load(et_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)
    if HAS_NODE or HAS_NODE2:
        s = tl.load(src_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)
        d = tl.load(dst_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)

    y = tl.full((BLOCK_E, BLOCK_O), 0.0, tl.float32)
    for j0 in range(0, DH, BLOCK_KH):  # h in column chunks, each consumed at once by the second product
        cols = j0 + offs_j
        c_mask = cols < DH
        ec_mask = e_mask[:, None] & c_mask[None, :]
        # h[:, cols] = silu(feat W_a[cols]^T + b_a (+ table[t]) (+ node_src[s] + node_dst[d])), K steps over C
        h = mm_k(tl.full((BLOCK_E, BLOCK_KH), 0.0, tl.float32), feat, e_idx, e_mask, wa, cols, c_mask, C, BLOCK_K, DOT)
        h += tl.load(ba_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_TAB:
            h += rows_at(tab, t, cols, ec_mask)
        if HAS_NODE:
            h += rows_at(ns, s, cols, ec_mask)
            h += rows_at(nd, d, cols, ec_mask)
        h = tl.where(c_mask[None, :], h / (1.0 + tl.exp(-h)), 0.0)  # silu; padded columns are 0
        wb_tile = tl.load(
            wb_ptr + offs_o[None, :] * stride_wbo + cols[:, None] * stride_wbi,
            mask=c_mask[:, None] & o_mask[None, :],
            other=0.0,
        )
        y += mm(h, wb_tile, DOT)

    # out = h W_b^T + b_b (+ node_src2[s] + node_dst2[d]) (then silu)
    y += tl.load(bb_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_NODE2:
        y += rows_at(ns2, s, offs_o, eo_mask)
        y += rows_at(nd2, d, offs_o, eo_mask)
    if ACT_OUT:
        y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + e_idx[:, None] * stride_out + offs_o[None, :], y, mask=eo_mask)


def edge_mlp(
    feat: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight_a: torch.Tensor,
    bias_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor,
    etype: torch.Tensor | None = None,
    type_table: torch.Tensor | None = None,
    node_src: torch.Tensor | None = None,
    node_dst: torch.Tensor | None = None,
    node_src2: torch.Tensor | None = None,
    node_dst2: torch.Tensor | None = None,
    act_out: bool = False,
    *,
    block_e: int | None = None,
    block_k: int | None = None,
    block_kh: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """(E, DO) float32; see the module docstring. The keywords override the launch heuristics (benchmarks,
    tests): edges per program, K steps over C and over DH (the h column chunk), warps, register cap
    (ptxas ``.maxnreg``: more resident programs, maybe spills)."""
    dev, e, c = utils.check_feat(OP, feat)
    utils.check_index(OP, "src", src, (e,), dev)
    utils.check_index(OP, "dst", dst, (e,), dev)
    utils.check_float(OP, "weight_a", weight_a, (None, c), dev)
    dh = weight_a.shape[0]
    utils.check_float(OP, "bias_a", bias_a, (dh,), dev)
    utils.check_float(OP, "weight_b", weight_b, (None, dh), dev)
    do = weight_b.shape[0]
    utils.check_float(OP, "bias_b", bias_b, (do,), dev)
    utils.check_pair(OP, "etype", etype, "type_table", type_table)
    utils.check_pair(OP, "node_src", node_src, "node_dst", node_dst)
    utils.check_pair(OP, "node_src2", node_src2, "node_dst2", node_dst2)
    has_tab, has_node, has_node2 = type_table is not None, node_src is not None, node_src2 is not None
    if has_tab:
        utils.check_index(OP, "etype", etype, (e,), dev)
        utils.check_float(OP, "type_table", type_table, (None, dh), dev)
    if has_node:
        utils.check_float(OP, "node_src", node_src, (None, dh), dev)
        utils.check_float(OP, "node_dst", node_dst, (None, dh), dev)
    if has_node2:
        utils.check_float(OP, "node_src2", node_src2, (None, do), dev)
        utils.check_float(OP, "node_dst2", node_dst2, (None, do), dev)
    out = torch.empty(e, do, dtype=torch.float32, device=dev)
    if e == 0 or do == 0:
        return out

    feat, weight_a, weight_b, type_table, node_src, node_dst, node_src2, node_dst2 = (
        utils.rowmajor(t) for t in (feat, weight_a, weight_b, type_table, node_src, node_dst, node_src2, node_dst2)
    )
    src, dst, etype, bias_a, bias_b = (utils.vec(t) for t in (src, dst, etype, bias_a, bias_b))
    block_o = utils.pow2(do)
    block_e = block_e or 64
    edge_mlp_kernel[(triton.cdiv(e, block_e),)](
        utils.mat(feat),
        src,
        dst,
        utils.edge_layer(weight_a, bias_a, etype, type_table, node_src, node_dst, src),
        utils.mat(weight_b),
        bias_b,
        utils.table(node_src2, bias_b),
        utils.table(node_dst2, bias_b),
        (out, out.stride(0)),
        e,
        c,
        dh,
        do,
        HAS_TAB=has_tab,
        HAS_NODE=has_node,
        HAS_NODE2=has_node2,
        ACT_OUT=bool(act_out),
        BLOCK_E=block_e,
        BLOCK_K=block_k or utils.k_step(c),
        BLOCK_KH=min(block_kh or 32, utils.pow2(dh)),
        BLOCK_O=block_o,
        DOT=utils.dot_args(feat, weight_a),
        num_warps=num_warps or (8 if block_o >= 64 else 4),
        maxnreg=maxnreg,
    )
    return out
