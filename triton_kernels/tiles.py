"""The dot product shared by the kernels: operand rounding per input dtype, fp32 accumulation.

Conventions of the kernels that call it: weights are PyTorch ``(out, in)`` matrices read transposed as
``(in, out)`` tiles through their strides (no host-side transposes or padding copies); tiles are zero-padded
to power-of-two blocks by masks; all arithmetic outside the dots is float32. Loads are written inline in the
kernels' edge loops: a helper call costs nothing on the GPU but a lot in Triton's interpreter (the tests).
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
