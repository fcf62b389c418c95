"""``segment_mean_csr``: the mean of each CSR row of an (E, D) tensor; the extension's scaffolding op.

    out[n] = 1 / (rowptr[n+1] - rowptr[n]) * sum_{e = rowptr[n]}^{rowptr[n+1]-1} src[e]   (0 for an empty row)

src: (E, D) floating point; rowptr: (N+1,) int64, nondecreasing, rowptr[0] = 0, rowptr[N] = E; out: (N, D),
src's dtype. The compiled kernels sum each row sequentially in CSR order (fp32 accumulation for half/bf16):
deterministic, thread-count independent, and the CPU and CUDA kernels agree bitwise. Differentiable: its fake
and autograd are registered in nino_fast/ops/library.py.
"""

from __future__ import annotations

import torch

from .._extension import has_cuda_ext, has_ext
from .reference import segment_mean as segment_mean_csr_reference

__all__ = ["segment_mean_csr", "segment_mean_csr_reference"]

# Decided once at import (not per call): a dispatcher query inside a compiled region would be a graph break.
_DEVICES = (("cpu", "cuda") if has_cuda_ext() else ("cpu",)) if has_ext() else ()


def segment_mean_csr(src: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """(N, D) mean of each CSR row of ``src`` (E, D); zero rows for empty segments (see the module docstring).

    Runs ``torch.ops.nino_fast.segment_mean_csr`` when the extension has a kernel for ``src``'s device, else
    the pure-PyTorch reference (same values up to summation order).
    """
    if src.device.type in _DEVICES:
        return torch.ops.nino_fast.segment_mean_csr(src, rowptr)
    return segment_mean_csr_reference(src, rowptr)
