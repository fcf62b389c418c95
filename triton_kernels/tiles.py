"""The dot product shared by the kernels: operand rounding per input dtype, fp32 accumulation.

Conventions of the kernels that call it: weights are PyTorch ``(out, in)`` matrices read transposed as
``(in, out)`` tiles through their strides (no host-side transposes or padding copies); tiles are zero-padded
to power-of-two blocks by masks; all arithmetic outside the dots is float32. Loads are written inline in the
kernels' edge loops: a helper call costs nothing on the GPU but a lot in Triton's interpreter (the tests);
``mm_k``, the K-stepped first product of every kernel, is the exception: one call covers a whole K loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """float32 ``a @ b`` with both operands rounded to DOT_DTYPE.

    float32: IEEE (FMA) or tf32x3 dots (PRECISION); bfloat16 / float16: tensor cores with fp32 accumulation.
    EMULATE (Triton's interpreter, which has no bf16 matmul) rounds the operands to DOT_DTYPE and multiplies
    exactly in fp32: the products of a tensor-core dot, summed in a possibly different order."""
    if DOT_DTYPE == tl.float32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    elif EMULATE:
        out = tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))
    return out


@triton.jit
def mm_k(
    acc,
    a_ptr,
    rows,
    row_mask,
    stride_ar,
    stride_ak,
    b_ptr,
    cols,
    col_mask,
    stride_bc,
    stride_bk,
    K,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """``acc + A[rows, :K] @ B[cols, :K]^T``, K in BLOCK_K steps, summed in step order.

    A is the (edges, K) input tile (feat), B a PyTorch ``(out, in)`` weight read transposed; masked rows,
    columns and the K tail are zeros. Small K steps keep the fp32 (FMA) dots' operands in registers; every
    kernel's first product goes through here, so all of them round and sum the same way."""
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
        acc += mm(x, w, DOT_DTYPE, PRECISION, EMULATE)
    return acc
