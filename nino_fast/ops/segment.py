"""``segment_mean_csr``: mean of each CSR row of a (E, D) tensor. The extension's smallest op."""

from __future__ import annotations

import torch

from .._extension import has_ext
from .reference import segment_mean as segment_mean_csr_reference

if has_ext():

    @torch.library.register_fake("nino_fast::segment_mean_csr")
    def _(src, rowptr):
        return src.new_empty(rowptr.shape[0] - 1, src.shape[1])


def segment_mean_csr(src: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """(N, D) ``out[n] = mean(src[rowptr[n]:rowptr[n+1]])`` (0 for empty rows); deterministic."""
    if has_ext() and (src.device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
            "nino_fast::segment_mean_csr", "CUDA")):
        return torch.ops.nino_fast.segment_mean_csr(src, rowptr)
    return segment_mean_csr_reference(src, rowptr)
