"""Loading of the compiled extension ``nino_fast._C``; its absence is never an import error.

If it cannot be loaded (not built, ABI mismatch with the installed torch, or ``NINO_FAST_DISABLE_EXT=1``), one
warning is logged on the ``nino_fast`` logger and every op runs on the next backend (Triton on GPU, else the
pure-PyTorch reference).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("nino_fast")
_ERROR: str | None = None

if os.environ.get("NINO_FAST_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no", "off"):
    _ERROR = "disabled by NINO_FAST_DISABLE_EXT"
else:
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.nino_fast.*)
    except Exception as exc:  # ImportError/OSError for a missing or ABI-broken .so; a registration clash
        _ERROR = f"{type(exc).__name__}: {exc}"
if _ERROR is not None:
    log.warning("nino_fast: C++ extension not loaded (%s); using the Triton/reference backends", _ERROR)


def has_ext() -> bool:
    """Whether ``nino_fast._C`` is loaded (its ops are in ``torch.ops.nino_fast``)."""
    return _ERROR is None


def ext_error() -> str | None:
    """Why the extension is not loaded (None if it is)."""
    return _ERROR


def _query_cuda_compiled() -> bool:
    if not has_ext():
        return False
    try:
        # Defined in csrc/nino_fast.cpp: true when the build compiled csrc/cuda/*.cu (a CUDA torch and nvcc
        # were found, or NINO_FAST_FORCE_CUDA=1). It says nothing about a GPU being visible now.
        return bool(torch.ops.nino_fast._cuda_compiled())
    except (AttributeError, RuntimeError):  # an older _C without the op: ask the dispatcher instead
        return torch._C._dispatch_has_kernel_for_dispatch_key("nino_fast::segment_mean_csr", "CUDA")


_CUDA_COMPILED = _query_cuda_compiled()


def has_cuda_ext() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels (a GPU may still be absent)."""
    return _CUDA_COMPILED


def release_cpu_buffers() -> None:
    """Free the CPU kernels' cached output buffers (they are reused within a NiNo step to avoid page faults on
    fresh pages; a step calls this when it ends, so no memory stays cached between steps)."""
    if has_ext():
        try:
            torch.ops.nino_fast._cpu_pool_release()
        except (AttributeError, RuntimeError):  # an extension built before the op existed
            pass
