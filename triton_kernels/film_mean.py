"""film_mean: one GNN layer's FiLM message + mean over destination-sorted CSR rows (spec: ops/reference.py).

    [scale_e; shift_e] = W e_e + b (+ table[etype_e])            W: (2D, C), b: (2D,), table: (T, 2D)
    out_n = mean_{e in row n} scale_e * (node_dst[n] + node_src[src_e]) + shift_e

Per edge only the scale half is computed, as a (BLOCK_E, C) @ (C, D) dot in BLOCK_K = 16 column steps. The
shift half is linear in the edge, so a task keeps per-lane sums of its edges' features (and a histogram of
their types) and applies the shift weights once, at the end of the task, in the kernel::

    sum_e shift_e = W_sh (sum_e e_e) + deg b_sh + sum_t count_t table_sh[t]

Rows are split and combined as in csr_split.py (one program per short row, fixed windows for long rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import csr_split, utils
from .csr_split import program_rows, store_result, task
from .tiles import mm, mm_k, row_at, rows_at

OP = "film_mean"


@triton.jit
def film_mean_kernel(
    feat,
    rowptr_ptr,
    src_ptr,
    nd,
    ns,
    w,
    b_ptr,
    et_ptr,
    tab,
    out,
    ws_ptr,
    win_rows_ptr,
    N,
    E,
    C,
    D,
    T,
    n_windows,
    CHUNK,
    LOG2N,
    HAS_TAB: tl.constexpr,
    TAB_HIST: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT: tl.constexpr,
):
    """feat, w: ``(ptr, stride_row, stride_col)``; nd, ns, tab, out: ``(ptr, stride_row)``."""
    feat_ptr, stride_fe, stride_fc = feat
    w_ptr, stride_wo, stride_wi = w
    tab_ptr, stride_tab = tab
    out_ptr, stride_out = out
    pid = tl.program_id(0)
    is_win, w0, w1, r_a, r_b = program_rows(pid, rowptr_ptr, N, E, n_windows, CHUNK, LOG2N)
    for t in range(0, tl.where(is_win, 2, 1)):  # a runtime loop: one copy of the segment code
        row, start, end, valid = task(t, is_win, w0, w1, r_a, r_b, rowptr_ptr, win_rows_ptr, pid, CHUNK)
        if valid:
            # total: the (BLOCK_D,) sum over edges [start, end) of row ``row`` of the FiLM messages (not divided
            # by the degree). The task's code is inline in the kernel (a helper costs nothing on the GPU but a lot
            # in the interpreter, and would repeat the kernel's argument list).
            offs_c = tl.arange(0, BLOCK_C)
            offs_d = tl.arange(0, BLOCK_D)
            offs_t = tl.arange(0, BLOCK_T)
            c_mask = offs_c < C
            d_mask = offs_d < D
            nd_row = row_at(nd, row, offs_d, d_mask)
            b_sc = tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            w_mask = c_mask[:, None] & d_mask[None, :]
            # per-lane accumulators, reduced over the edge axis once after the loop
            acc = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)
            fsum = tl.full((BLOCK_E, BLOCK_C), 0.0, tl.float32)
            tsum = tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32)  # gathered shift-table rows (TAB_HIST == False)
            tcnt = tl.full((BLOCK_E, BLOCK_T), 0.0, tl.float32)  # type histogram (TAB_HIST == True)
            for e0 in range(start, end, BLOCK_E):
                e_idx = e0 + tl.arange(0, BLOCK_E)
                e_mask = e_idx < end
                ed_mask = e_mask[:, None] & d_mask[None, :]
                # scale half: (BLOCK_E, C) @ (C, D) in BLOCK_K steps (small K keeps fp32 FMA dots' operands small);
                # the whole feature tile also feeds the per-lane feature sums of the shift half
                x = tl.load(
                    feat_ptr + e_idx[:, None] * stride_fe + offs_c[None, :] * stride_fc,
                    mask=e_mask[:, None] & c_mask[None, :],
                    other=0.0,
                )
                if BLOCK_K >= BLOCK_C:  # C <= BLOCK_K (C = 5 in NiNo): one product
                    w_tile = tl.load(
                        w_ptr + offs_d[None, :] * stride_wo + offs_c[:, None] * stride_wi, mask=w_mask, other=0.0
                    )
                    scale = mm(x, w_tile, DOT)
                else:  # the chunks are re-read from L1
                    scale = mm_k(
                        tl.full((BLOCK_E, BLOCK_D), 0.0, tl.float32),
                        feat,
                        e_idx,
                        e_mask,
                        w,
                        offs_d,
                        d_mask,
                        C,
                        BLOCK_K,
                        DOT,
                    )
                scale += b_sc[None, :]
                fsum += x.to(tl.float32)
                if HAS_TAB:
                    ty = tl.load(et_ptr + e_idx, mask=e_mask, other=0)
                    tab_ptrs = tab_ptr + ty.to(tl.int64)[:, None] * stride_tab + offs_d[None, :]
                    scale += tl.load(tab_ptrs, mask=ed_mask, other=0.0).to(tl.float32)
                    if TAB_HIST:
                        tcnt += ((ty[:, None] == offs_t[None, :]) & e_mask[:, None]).to(tl.float32)
                    else:
                        tsum += tl.load(tab_ptrs + D, mask=ed_mask, other=0.0).to(tl.float32)
                s = tl.load(src_ptr + e_idx, mask=e_mask, other=0).to(tl.int64)
                ns_rows = rows_at(ns, s, offs_d, ed_mask)
                acc += tl.where(e_mask[:, None], scale * (nd_row[None, :] + ns_rows), 0.0)
            # shift half, once per task: W_sh sum_e x_e + n b_sh (+ type counts @ table_sh)
            w_sh = tl.load(
                w_ptr + (D + offs_d[None, :]) * stride_wo + offs_c[:, None] * stride_wi, mask=w_mask, other=0.0
            ).to(tl.float32)
            b_sh = tl.load(b_ptr + D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            total = tl.sum(acc, axis=0) + tl.sum(tl.sum(fsum, axis=0)[:, None] * w_sh, axis=0)
            total += (end - start).to(tl.float32) * b_sh
            if HAS_TAB:
                if TAB_HIST:
                    tab_sh = tl.load(
                        tab_ptr + offs_t[:, None] * stride_tab + D + offs_d[None, :],
                        mask=(offs_t[:, None] < T) & d_mask[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    total += tl.sum(tl.sum(tcnt, axis=0)[:, None] * tab_sh, axis=0)
                else:
                    total += tl.sum(tsum, axis=0)
            store_result(
                total, D, out_ptr, stride_out, ws_ptr, is_win, pid, t, row, (end - start).to(tl.float32), BLOCK_D
            )


def film_mean(
    feat: torch.Tensor,
    rowptr: torch.Tensor,
    src: torch.Tensor,
    node_dst: torch.Tensor,
    node_src: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    etype: torch.Tensor | None = None,
    type_table: torch.Tensor | None = None,
    *,
    block_e: int | None = None,
    block_k: int | None = None,
    chunk: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """(N, D) float32; see the module docstring. The keywords override the launch heuristics (benchmarks,
    tests): edges per step, K step over C, edges per long-row window, warps,
    register cap (ptxas ``.maxnreg``: more resident programs, maybe spills)."""
    dev, e, c, n = utils.check_csr(OP, feat, rowptr, src)
    utils.check_float(OP, "node_dst", node_dst, (n, None), dev)
    d = node_dst.shape[1]
    utils.check_float(OP, "node_src", node_src, (None, d), dev)
    utils.check_float(OP, "weight", weight, (2 * d, c), dev)
    utils.check_float(OP, "bias", bias, (2 * d,), dev)
    utils.check_pair(OP, "etype", etype, "type_table", type_table)
    has_tab = type_table is not None
    if has_tab:
        utils.check_index(OP, "etype", etype, (e,), dev)
        utils.check_float(OP, "type_table", type_table, (None, 2 * d), dev)
    if n == 0 or e == 0 or d == 0:
        return torch.zeros(n, d, dtype=torch.float32, device=dev)

    feat, node_dst, node_src, weight = (utils.rowmajor(t) for t in (feat, node_dst, node_src, weight))
    rowptr, src, bias = utils.vec(rowptr).to(torch.int64), utils.vec(src), utils.vec(bias)
    etype, type_table = utils.vec(etype), utils.rowmajor(type_table)
    n_types = type_table.shape[0] if has_tab else 1
    block_t = utils.pow2(n_types, lo=16)
    block_d = utils.pow2(d)
    block_e = block_e or 32
    split = csr_split.plan(n, e, utils.split_chunk(e, dev, block_e, chunk), d, dev)
    out = torch.empty(n, d, dtype=torch.float32, device=dev)
    film_mean_kernel[split.grid](
        utils.mat(feat),
        rowptr,
        src,
        utils.table(node_dst, bias),
        utils.table(node_src, bias),
        utils.mat(weight),
        bias,
        etype if has_tab else src,
        utils.table(type_table, bias),
        (out, out.stride(0)),
        split.ws,
        split.win_rows,
        n,
        e,
        c,
        d,
        n_types,
        split.n_windows,
        split.chunk,
        split.log2n,
        HAS_TAB=has_tab,
        TAB_HIST=block_t <= 32,
        BLOCK_E=block_e,
        BLOCK_C=utils.pow2(c),
        BLOCK_K=block_k or utils.k_step(c),
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        DOT=utils.dot_args(feat, weight),
        num_warps=num_warps or 8,
        maxnreg=maxnreg,
    )
    csr_split.combine(split, rowptr, out)
    return out
