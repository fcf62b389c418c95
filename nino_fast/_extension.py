"""Loading of the compiled extension ``nino_fast._C``; its absence is never an import error.

If it cannot be loaded (not built, ABI mismatch, or ``NINO_FAST_DISABLE_EXT=1``), one warning is logged on the
``nino_fast`` logger and every op runs on the next backend (Triton on GPU, else the pure-PyTorch reference).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("nino_fast")
_ERROR: str | None = None

if os.environ.get("NINO_FAST_DISABLE_EXT", "0") not in ("", "0"):
    _ERROR = "disabled by NINO_FAST_DISABLE_EXT"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.nino_fast.*)
    except ImportError as exc:
        _ERROR = f"{type(exc).__name__}: {exc}"
if _ERROR is not None:
    log.warning("nino_fast: C++ extension not loaded (%s); using the Triton/reference backends", _ERROR)


def has_ext() -> bool:
    """Whether ``nino_fast._C`` is loaded."""
    return _ERROR is None


def ext_error() -> str | None:
    """Why the extension is not loaded (None if it is)."""
    return _ERROR


def has_cuda_ext() -> bool:
    """Whether the loaded extension was compiled with CUDA kernels."""
    return has_ext() and torch._C._dispatch_has_kernel_for_dispatch_key("nino_fast::segment_mean_csr", "CUDA")
