"""The dot products shared by the kernels: operand rounding per input dtype, fp32 accumulation.

Conventions of the kernels that call them: a 2-D operand travels as one tuple ``(ptr, stride_row, stride_col)``
and a gathered node table as ``(ptr, stride_row)`` (unit column stride: the launchers make it so); weights are
PyTorch ``(out, in)`` matrices read transposed as ``(in, out)`` tiles through their strides (no host-side
transposes or padding copies); tiles are zero-padded to power-of-two blocks by masks; all arithmetic outside the
dots is float32; ``DOT`` is the constexpr tuple ``(operand dtype, fp32 precision, emulate)`` of
``utils.dot_args``. Loads are written inline in the kernels' edge loops: a helper call costs nothing on the GPU but
a lot in Triton's interpreter (the tests), so the helpers here are few: ``mm_k`` covers a whole K loop, ``rows_at``
and ``row_at`` the gathers of node and type rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT: tl.constexpr):
    """float32 ``a @ b`` with both operands rounded to ``DOT[0]``.

    float32: IEEE (FMA) or tf32x3 dots (``DOT[1]``); bfloat16 / float16: tensor cores with fp32 accumulation.
    ``DOT[2]`` (Triton's interpreter, which has no bf16 matmul) rounds the operands to the dtype and multiplies
    exactly in fp32: the products of a tensor-core dot, summed in a possibly different order."""
    if DOT[0] == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT[1])
    elif DOT[2]:
        out = tl.dot(a.to(DOT[0]).to(tl.float32), b.to(DOT[0]).to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(DOT[0]), b.to(DOT[0]))
    return out


@triton.jit
def mm_k(acc, a, rows, row_mask, b, cols, col_mask, K, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """``acc + A[rows, :K] @ B[cols, :K]^T``, K in BLOCK_K steps, summed in step order.

    ``a`` is the (edges, K) input (feat), ``b`` a PyTorch ``(out, in)`` weight read transposed, both
    ``(ptr, stride_row, stride_col)``; masked rows, columns and the K tail are zeros. Small K steps keep the fp32
    (FMA) dots' operands in registers; every kernel's first product goes through here, so all of them round and
    sum the same way."""
    a_ptr, stride_ar, stride_ak = a
    b_ptr, stride_bc, stride_bk = b
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(
            a_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak,
            mask=row_mask[:, None] & (ks[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            b_ptr + cols[None, :] * stride_bc + ks[:, None] * stride_bk,
            mask=(ks[:, None] < K) & col_mask[None, :],
            other=0.0,
        )
        acc += mm(x, w, DOT)
    return acc


@triton.jit
def rows_at(table, idx, cols, mask):
    """float32 ``table[idx][:, cols]`` of a gathered table ``(ptr, stride_row)``: one row per index (a node or an
    edge type), zeros where ``mask`` is off."""
    ptr, stride = table
    return tl.load(ptr + idx[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_at(table, i, cols, mask):
    """float32 ``table[i, cols]``: one row of a table ``(ptr, stride_row)``, zeros where ``mask`` is off."""
    ptr, stride = table
    return tl.load(ptr + i * stride + cols, mask=mask, other=0.0).to(tl.float32)
