"""Deterministic load balancing of the CSR reductions (film_mean, edge_film_mean): no float atomics.

The edges are cut into fixed windows of CHUNK edges, ``[j CHUNK, (j+1) CHUNK)``. One launch runs two kinds of
program (window programs first, so that long rows start early):

* program ``j < n_windows`` (window): a row with more than CHUNK edges ("long") is summed per window. A window
  meets at most two long rows: the row holding its first edge (slot 0) and the row holding its last edge when
  different (slot 1; a long row that starts inside a window runs past its end). It writes each partial sum
  (not normalised) to ``ws[j, slot]`` and the row's id to ``win_rows[j, slot]`` (-1: none).
* program ``n_windows + r`` (row): row r, if it has at most CHUNK edges, summed in edge order and divided by
  its degree (a row without edges gives 0).

A second small launch (:func:`combine`) sums each long row's window partials in window order and divides by
the degree. Which edges a program sums, and in which order, depends only on rowptr, E and CHUNK, so results
are bitwise identical run to run. Window rows are found by binary search over rowptr on the device: nothing
waits for the host. When E <= CHUNK no row can be long: no windows, no workspace, no second launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def row_of(rowptr_ptr, n_rows, e, LOG2N):
    """The CSR row holding edge ``e``: the largest r < n_rows with rowptr[r] <= e (skips empty rows).

    Binary search keeping rowptr[lo] <= e < rowptr[hi]; LOG2N = n_rows.bit_length() halvings suffice."""
    lo = e * 0
    hi = lo + n_rows
    for _ in range(0, LOG2N):
        mid = (lo + hi) // 2
        ok = tl.load(rowptr_ptr + mid) <= e
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def program_rows(pid, rowptr_ptr, N, E, n_windows, CHUNK, LOG2N):
    """(is_window, w0, w1, r_a, r_b): a window's bounds and its (up to two) rows, or a row program's row."""
    is_win = pid < n_windows
    j = pid.to(tl.int64)
    w0 = j * CHUNK
    w1 = tl.minimum(w0 + CHUNK, E)
    r_a = j - n_windows
    r_b = r_a
    if is_win:
        r_a = row_of(rowptr_ptr, N, w0, LOG2N)
        r_b = row_of(rowptr_ptr, N, w1 - 1, LOG2N)
    return is_win, w0, w1, r_a, r_b


@triton.jit
def task(t, is_win, w0, w1, r_a, r_b, rowptr_ptr, win_rows_ptr, pid, CHUNK):
    """Task t (0 or 1) of a program: (row, start, end, valid), the edges [start, end) of ``row`` it sums.

    A window program also records the row of its task t (-1: none) for the combine pass."""
    r = tl.where(t == 0, r_a, r_b)
    rs = tl.load(rowptr_ptr + r)
    re = tl.load(rowptr_ptr + r + 1)
    is_long = (re - rs) > CHUNK
    valid = tl.where(is_win, is_long & ((t == 0) | (r_b != r_a)), (t == 0) & (~is_long))
    start = tl.where(is_win, tl.maximum(rs, w0), rs)
    end = tl.where(is_win, tl.minimum(re, w1), re)
    if is_win:
        tl.store(win_rows_ptr + 2 * pid + t, tl.where(valid, r, -1))
    return r, start, end, valid


@triton.jit
def store_result(vals, n_cols, out_ptr, stride_out, ws_ptr, is_win, pid, t, row, deg, BLOCK: tl.constexpr):
    """Store a task's sum: ``out[row] = vals / max(deg, 1)`` (row program), ``ws[pid, t] = vals`` (window)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    if is_win:
        tl.store(ws_ptr + (2 * pid.to(tl.int64) + t) * n_cols + offs, vals, mask=mask)
    else:
        tl.store(out_ptr + row * stride_out + offs, vals / tl.maximum(deg, 1.0), mask=mask)


@triton.jit
def _combine_kernel(ws_ptr, win_rows_ptr, rowptr_ptr, out_ptr, stride_out, P, CHUNK, BLOCK_P: tl.constexpr):
    """Program (j, slot): if window j holds the first edges of a long row in ``slot``, sum its partials."""
    j = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1)
    r = tl.load(win_rows_ptr + 2 * j + slot)
    if r >= 0:
        start = tl.load(rowptr_ptr + r)
        end = tl.load(rowptr_ptr + r + 1)
        if (slot == 1) | (start == j * CHUNK):  # this is the row's first window
            offs = tl.arange(0, BLOCK_P)
            mask = offs < P
            acc = tl.load(ws_ptr + (2 * j + slot) * P + offs, mask=mask, other=0.0)
            for jj in range(j + 1, (end - 1) // CHUNK + 1):  # later windows hold the row in slot 0
                acc += tl.load(ws_ptr + 2 * jj * P + offs, mask=mask, other=0.0)
            tl.store(out_ptr + r * stride_out + offs, acc / (end - start).to(tl.float32), mask=mask)


@dataclass
class Split:
    """Launch geometry of a split CSR reduction whose rows are ``width`` floats wide."""

    chunk: int
    n_windows: int
    n_rows: int
    log2n: int  # binary-search steps over rowptr
    ws: torch.Tensor  # (max(n_windows, 1), 2, width) float32 window partials
    win_rows: torch.Tensor  # (max(n_windows, 1), 2) int64 row of each partial, -1 for none

    @property
    def grid(self) -> tuple[int]:
        return (self.n_windows + self.n_rows,)


def plan(num_rows: int, num_edges: int, chunk: int, width: int, device: torch.device) -> Split:
    n_windows = triton.cdiv(num_edges, chunk) if num_edges > chunk else 0
    m = max(n_windows, 1)
    ws = torch.empty(m, 2, width, dtype=torch.float32, device=device)
    win_rows = torch.empty(m, 2, dtype=torch.int64, device=device)
    return Split(chunk, n_windows, num_rows, max(int(num_rows).bit_length(), 1), ws, win_rows)


def combine(split: Split, rowptr: torch.Tensor, out: torch.Tensor) -> None:
    """Finish the long rows of ``out`` (rows of width ``split.ws.shape[2]``) from the window partials."""
    if split.n_windows == 0:
        return
    width = split.ws.shape[2]
    _combine_kernel[(split.n_windows, 2)](
        split.ws,
        split.win_rows,
        rowptr,
        out,
        out.stride(0),
        width,
        split.chunk,
        BLOCK_P=triton.next_power_of_2(width),
        num_warps=4,
    )
