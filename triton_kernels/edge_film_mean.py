"""edge_film_mean: layer l's edge update fused with layer l+1's FiLM mean (spec: ops/reference.py).

    h_e   = silu(W_a e_e + b_a + table[etype_e] + node_src[src_e] + node_dst[n])       W_a: (DH, C)
    out_n = mean_{e in row n} (W_sc h_e + b_sc) * (msg_dst[n] + msg_src[src_e]) + W_sh h_e + b_sh

The edge state h never leaves the program. Per BLOCK_E edges of a row, h is built BLOCK_KH columns at a time
(a (BLOCK_E, C) @ (C, BLOCK_KH) dot, the bias / table / gathers, SiLU) and consumed at once by the scale
product (BLOCK_E, BLOCK_KH) @ (BLOCK_KH, D), accumulated over the chunks; every dot has K <= 32, which keeps
the fp32 (FMA) path's operands in registers. The shift half is linear in h, so it never needs a per-edge
product::

    sum_e (W_sh h_e + b_sh) = W_sh (sum_e h_e) + deg b_sh

each chunk's column sum goes through W_sh (a (BLOCK_KH, D) GEMV per BLOCK_E edges, in fp32) inside the kernel.
Rows are split and combined as in csr_split.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import csr_split, utils
from .csr_split import program_rows, store_result, task
from .tiles import mm, mm_k, row_at, rows_at

OP = "edge_film_mean"


@triton.jit
def edge_film_mean_kernel(
    feat,
    rowptr_ptr,
    src_ptr,
    edge,
    md,
    ms,
    wsc,
    bsc_ptr,
    wsh,
    bsh_ptr,
    out,
    ws_ptr,
    win_rows_ptr,
    N,
    E,
    C,
    DH,
    D,
    n_windows,
    CHUNK,
    LOG2N,
    HAS_TAB: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT: tl.constexpr,
):
    """edge: the edge layer's ``(wa, ba_ptr, et_ptr, tab, ns, nd)`` (``utils.edge_layer``); feat, wa, wsc, wsh:
    ``(ptr, stride_row, stride_col)``; tab, ns, nd, md, ms, out: ``(ptr, stride_row)``."""
    wa, ba_ptr, et_ptr, tab, ns, nd = edge
    out_ptr, stride_out = out
    wsc_ptr, stride_wso, stride_wsi = wsc
    wsh_ptr, stride_who, stride_whi = wsh
    pid = tl.program_id(0)
    is_win, w0, w1, r_a, r_b = program_rows(pid, rowptr_ptr, N, E, n_windows, CHUNK, LOG2N)
    offs_d = tl.arange(0, BLOCK_D)
    bsh = tl.load(bsh_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    for t in range(0, tl.where(is_win, 2, 1)):  # a runtime loop: one copy of the segment code
        row, start, end, valid = task(t, is_win, w0, w1, r_a, r_b, rowptr_ptr, win_rows_ptr, pid, CHUNK)
        if valid:
            # total: the (BLOCK_D,) sum over edges [start, end) of row ``row`` of the messages, without the shift
            # bias (inline in the kernel: a helper would repeat the kernel's argument list).
            # h is produced BLOCK_KH columns at a time and consumed at once: the scale dot accumulates over the chunks
            # (K = BLOCK_KH per product), and each chunk's column sum goes through W_sh right away (a (BLOCK_KH, D) GEMV
            # per BLOCK_E edges: ~1/BLOCK_E of the scale dot's work).
            offs_j = tl.arange(0, BLOCK_KH)
            d_mask = offs_d < D
            md_row = row_at(md, row, offs_d, d_mask)
            bsc = tl.load(bsc_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            acc = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)  # per-lane message sums, reduced once after the loop
            shift = tl.full((BLOCK_D,), 0.0, tl.float32)
            for e0 in range(start, end, BLOCK_E):
                e_idx = e0 + tl.arange(0, BLOCK_E)
                e_mask = e_idx < end
                s = tl.load(src_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)
                if HAS_TAB:
                    ty = tl.load(et_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)
                scale = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)
                for j0 in range(0, DH, BLOCK_KH):
                    cols = j0 + offs_j
                    c_mask = cols < DH
                    ec_mask = e_mask[:, None] & c_mask[None, :]
                    # h[:, cols] = silu(feat W_a[cols]^T + b_a + node_dst[n] + node_src[s] (+ table[ty])), K steps on C
                    h = mm_k(
                        tl.full((BLOCK_E, BLOCK_KH), 0.0, tl.float32),
                        feat,
                        e_idx,
                        e_mask,
                        wa,
                        cols,
                        c_mask,
                        C,
                        BLOCK_K,
                        DOT,
                    )
                    hrow = row_at(nd, row, cols, c_mask) + tl.load(ba_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
                    h += hrow[None, :] + rows_at(ns, s, cols, ec_mask)
                    if HAS_TAB:
                        h += rows_at(tab, ty, cols, ec_mask)
                    h = tl.where(ec_mask, h / (1.0 + tl.exp(-h)), 0.0)  # silu; padded lanes and columns are 0
                    w_sc = tl.load(
                        wsc_ptr + offs_d[None, :] * stride_wso + cols[:, None] * stride_wsi,
                        mask=c_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    scale += mm(h, w_sc, DOT)
                    w_sh = tl.load(
                        wsh_ptr + offs_d[None, :] * stride_who + cols[:, None] * stride_whi,
                        mask=c_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    shift += tl.sum(tl.sum(h, axis=0)[:, None] * w_sh, axis=0)
                ms_rows = rows_at(ms, s, offs_d, e_mask[:, None] & d_mask[None, :])
                acc += tl.where(e_mask[:, None], (scale + bsc[None, :]) * (md_row[None, :] + ms_rows), 0.0)
            total = tl.sum(acc, axis=0) + shift
            deg = (end - start).to(tl.float32)
            store_result(total + deg * bsh, D, out_ptr, stride_out, ws_ptr, is_win, pid, t, row, deg, BLOCK_D)


def edge_film_mean(
    feat: torch.Tensor,
    rowptr: torch.Tensor,
    src: torch.Tensor,
    weight_a: torch.Tensor,
    bias_a: torch.Tensor,
    etype: torch.Tensor | None,
    type_table: torch.Tensor | None,
    node_src: torch.Tensor,
    node_dst: torch.Tensor,
    msg_dst: torch.Tensor,
    msg_src: torch.Tensor,
    weight_scale: torch.Tensor,
    bias_scale: torch.Tensor,
    weight_shift: torch.Tensor,
    bias_shift: torch.Tensor,
    *,
    block_e: int | None = None,
    block_k: int | None = None,
    block_kh: int | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """(N, D) float32; see the module docstring. The keywords override the launch heuristics (benchmarks,
    tests): edges per step, K steps over C and over DH (the h column chunk), edges per long-row window,
    warps, register cap (ptxas ``.maxnreg``: more resident programs, maybe spills)."""
    dev, e, c, n = utils.check_csr(OP, feat, rowptr, src)
    utils.check_float(OP, "weight_a", weight_a, (None, c), dev)
    dh = weight_a.shape[0]
    utils.check_float(OP, "bias_a", bias_a, (dh,), dev)
    utils.check_pair(OP, "etype", etype, "type_table", type_table)
    has_tab = type_table is not None
    if has_tab:
        utils.check_index(OP, "etype", etype, (e,), dev)
        utils.check_float(OP, "type_table", type_table, (None, dh), dev)
    utils.check_float(OP, "node_src", node_src, (None, dh), dev)
    utils.check_float(OP, "node_dst", node_dst, (n, dh), dev)
    utils.check_float(OP, "weight_scale", weight_scale, (None, dh), dev)
    d = weight_scale.shape[0]
    utils.check_float(OP, "msg_dst", msg_dst, (n, d), dev)
    utils.check_float(OP, "msg_src", msg_src, (None, d), dev)
    utils.check_float(OP, "bias_scale", bias_scale, (d,), dev)
    utils.check_float(OP, "weight_shift", weight_shift, (d, dh), dev)
    utils.check_float(OP, "bias_shift", bias_shift, (d,), dev)
    if n == 0 or e == 0 or d == 0:
        return torch.zeros(n, d, dtype=torch.float32, device=dev)

    feat, weight_a, node_src, node_dst, msg_dst, msg_src, weight_scale, weight_shift = (
        utils.rowmajor(t) for t in (feat, weight_a, node_src, node_dst, msg_dst, msg_src, weight_scale, weight_shift)
    )
    rowptr, src, bias_a, bias_scale, bias_shift = (utils.vec(t) for t in (rowptr, src, bias_a, bias_scale, bias_shift))
    rowptr = rowptr.to(torch.int64)
    etype, type_table = utils.vec(etype), utils.rowmajor(type_table)
    block_d = utils.pow2(d)
    block_e = block_e or 32
    block_k = block_k or utils.k_step(c)
    split = csr_split.plan(n, e, utils.split_chunk(e, dev, block_e, chunk), d, dev)
    out = torch.empty(n, d, dtype=torch.float32, device=dev)
    edge_film_mean_kernel[split.grid](
        utils.mat(feat),
        rowptr,
        src,
        utils.edge_layer(weight_a, bias_a, etype, type_table, node_src, node_dst, src),
        utils.table(msg_dst, bias_a),
        utils.table(msg_src, bias_a),
        utils.mat(weight_scale),
        bias_scale,
        utils.mat(weight_shift),
        bias_shift,
        (out, out.stride(0)),
        split.ws,
        split.win_rows,
        n,
        e,
        c,
        dh,
        d,
        split.n_windows,
        split.chunk,
        split.log2n,
        HAS_TAB=has_tab,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        BLOCK_KH=min(block_kh or 32, utils.pow2(dh)),
        BLOCK_D=block_d,
        DOT=utils.dot_args(feat, weight_a),
        num_warps=num_warps or 8,
        maxnreg=maxnreg,
    )
    csr_split.combine(split, rowptr, out)
    return out
