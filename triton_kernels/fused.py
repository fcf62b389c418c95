"""Triton kernels of the three fused NiNo ops (spec: nino_fast/ops/reference.py).

Layout: edge features (E, C) row-major; weights pre-transposed to (K, N) and zero-padded to powers of two so
``tl.dot`` tiles are legal; per-node tables (N, D). All accumulation in fp32; fp32 inputs use IEEE dots
(``input_precision="ieee"``) so results match the reference to ~1e-6, bf16/fp16 inputs use tensor cores.

Reductions: ``film_mean`` and ``edge_film_mean`` run one program per destination row that walks its edges in
BLOCK_E chunks in order (no atomics: deterministic run to run). The shift half of the encoder is linear in the
edge input, so each program sums the inputs over its row and applies the shift weights once per row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _affine_tile(feat_ptr, e_idx, e_mask, C, w_ptr, b_ptr, et_ptr, tab_ptr, HAS_TAB: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, D, IEEE: tl.constexpr):
    """(BLOCK_E, BLOCK_D) = feat[e] @ W^T + b (+ table[etype[e]]); W given transposed and padded (BLOCK_C, BLOCK_D)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(feat_ptr + e_idx[:, None] * C + offs_c[None, :], mask=e_mask[:, None] & (offs_c[None, :] < C),
                other=0.0)
    w = tl.load(w_ptr + offs_c[:, None] * BLOCK_D + offs_d[None, :])
    if IEEE:
        y = tl.dot(x, w, input_precision="ieee")
    else:
        y = tl.dot(x, w)
    d_mask = offs_d < D
    y += tl.load(b_ptr + offs_d, mask=d_mask, other=0.0)[None, :]
    if HAS_TAB:
        t = tl.load(et_ptr + e_idx, mask=e_mask, other=0)
        y += tl.load(tab_ptr + t[:, None] * D + offs_d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0)
    return y


@triton.jit
def film_mean_kernel(feat_ptr, rowptr_ptr, src_ptr, nd_ptr, ns_ptr, wsc_ptr, bsc_ptr, wsh_ptr, bsh_ptr, et_ptr,
                     tabsc_ptr, tabsh_ptr, out_ptr, C, D, HAS_TAB: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    d_mask = offs_d < D
    nd = tl.load(nd_ptr + row * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    fsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    tsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e_idx = e0 + tl.arange(0, BLOCK_E)
        e_mask = e_idx < end
        sc = _affine_tile(feat_ptr, e_idx, e_mask, C, wsc_ptr, bsc_ptr, et_ptr, tabsc_ptr, HAS_TAB, BLOCK_C,
                          BLOCK_D, D, IEEE)
        s = tl.load(src_ptr + e_idx, mask=e_mask, other=0)
        ns = tl.load(ns_ptr + s[:, None] * D + offs_d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0)
        msg = sc * (nd[None, :] + ns.to(tl.float32))
        acc += tl.sum(tl.where(e_mask[:, None], msg, 0.0), axis=0)
        x = tl.load(feat_ptr + e_idx[:, None] * C + offs_c[None, :], mask=e_mask[:, None] & (offs_c[None, :] < C),
                    other=0.0)
        fsum += tl.sum(x.to(tl.float32), axis=0)
        if HAS_TAB:
            t = tl.load(et_ptr + e_idx, mask=e_mask, other=0)
            tsum += tl.sum(tl.load(tabsh_ptr + t[:, None] * D + offs_d[None, :],
                                   mask=e_mask[:, None] & d_mask[None, :], other=0.0), axis=0)
    deg = (end - start).to(tl.float32)
    wsh = tl.load(wsh_ptr + offs_c[:, None] * BLOCK_D + offs_d[None, :]).to(tl.float32)
    shift = tl.sum(fsum[:, None] * wsh, axis=0) + deg * tl.load(bsh_ptr + offs_d, mask=d_mask, other=0.0) + tsum
    out = tl.where(deg > 0, (acc + shift) / tl.maximum(deg, 1.0), 0.0)
    tl.store(out_ptr + row * D + offs_d, out, mask=d_mask)


@triton.jit
def edge_film_mean_kernel(feat_ptr, rowptr_ptr, src_ptr, wa_ptr, ba_ptr, et_ptr, tab_ptr, ns_ptr, nd_ptr, md_ptr,
                          ms_ptr, wsc_ptr, bsc_ptr, wsh_ptr, bsh_ptr, out_ptr, C, DH, D, HAS_TAB: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < DH
    d_mask = offs_d < D
    t_row = tl.load(nd_ptr + row * DH + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    md = tl.load(md_ptr + row * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    bsc = tl.load(bsc_ptr + offs_d, mask=d_mask, other=0.0)
    wsc = tl.load(wsc_ptr + offs_h[:, None] * BLOCK_D + offs_d[None, :])
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    hsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e_idx = e0 + tl.arange(0, BLOCK_E)
        e_mask = e_idx < end
        s = tl.load(src_ptr + e_idx, mask=e_mask, other=0)
        h = _affine_tile(feat_ptr, e_idx, e_mask, C, wa_ptr, ba_ptr, et_ptr, tab_ptr, HAS_TAB, BLOCK_C, BLOCK_H,
                         DH, IEEE)
        h += tl.load(ns_ptr + s[:, None] * DH + offs_h[None, :], mask=e_mask[:, None] & h_mask[None, :],
                     other=0.0).to(tl.float32) + t_row[None, :]
        h = tl.where(e_mask[:, None] & h_mask[None, :], _silu(h), 0.0)
        if IEEE:
            sc = tl.dot(h, wsc.to(tl.float32), input_precision="ieee")
        else:
            sc = tl.dot(h.to(wsc.dtype), wsc)
        ms = tl.load(ms_ptr + s[:, None] * D + offs_d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0)
        msg = (sc + bsc[None, :]) * (md[None, :] + ms.to(tl.float32))
        acc += tl.sum(tl.where(e_mask[:, None], msg, 0.0), axis=0)
        hsum += tl.sum(h, axis=0)
    deg = (end - start).to(tl.float32)
    wsh = tl.load(wsh_ptr + offs_h[:, None] * BLOCK_D + offs_d[None, :]).to(tl.float32)
    shift = tl.sum(hsum[:, None] * wsh, axis=0) + deg * tl.load(bsh_ptr + offs_d, mask=d_mask, other=0.0)
    out = tl.where(deg > 0, (acc + shift) / tl.maximum(deg, 1.0), 0.0)
    tl.store(out_ptr + row * D + offs_d, out, mask=d_mask)


@triton.jit
def edge_mlp_kernel(feat_ptr, src_ptr, dst_ptr, wa_ptr, ba_ptr, et_ptr, tab_ptr, ns_ptr, nd_ptr, wb_ptr, bb_ptr,
                    ns2_ptr, nd2_ptr, out_ptr, E, C, DH, DO, HAS_TAB: tl.constexpr, HAS_NODE: tl.constexpr,
                    HAS_NODE2: tl.constexpr, ACT_OUT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    e_idx = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    offs_h = tl.arange(0, BLOCK_H)
    offs_o = tl.arange(0, BLOCK_O)
    h_mask = offs_h < DH
    o_mask = offs_o < DO
    h = _affine_tile(feat_ptr, e_idx, e_mask, C, wa_ptr, ba_ptr, et_ptr, tab_ptr, HAS_TAB, BLOCK_C, BLOCK_H, DH,
                     IEEE)
    if HAS_NODE or HAS_NODE2:
        s = tl.load(src_ptr + e_idx, mask=e_mask, other=0)
        t = tl.load(dst_ptr + e_idx, mask=e_mask, other=0)
    if HAS_NODE:
        m2 = e_mask[:, None] & h_mask[None, :]
        h += tl.load(ns_ptr + s[:, None] * DH + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
        h += tl.load(nd_ptr + t[:, None] * DH + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
    h = tl.where(h_mask[None, :], _silu(h), 0.0)
    wb = tl.load(wb_ptr + offs_h[:, None] * BLOCK_O + offs_o[None, :])
    if IEEE:
        y = tl.dot(h, wb.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(h.to(wb.dtype), wb)
    y += tl.load(bb_ptr + offs_o, mask=o_mask, other=0.0)[None, :]
    m3 = e_mask[:, None] & o_mask[None, :]
    if HAS_NODE2:
        y += tl.load(ns2_ptr + s[:, None] * DO + offs_o[None, :], mask=m3, other=0.0).to(tl.float32)
        y += tl.load(nd2_ptr + t[:, None] * DO + offs_o[None, :], mask=m3, other=0.0).to(tl.float32)
    if ACT_OUT:
        y = _silu(y)
    tl.store(out_ptr + e_idx[:, None] * DO + offs_o[None, :], y, mask=m3)
