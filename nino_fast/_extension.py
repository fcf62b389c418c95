"""Loading of the compiled extension ``nino_fast._C``; its absence is never an import error.

If it cannot be loaded (not built, ABI mismatch with the installed torch, or ``NINO_FAST_DISABLE_EXT=1``), one
warning is logged on the ``nino_fast`` logger and every op runs on the next backend (Triton on GPU, else the
pure-PyTorch reference).
"""

from __future__ import annotations

import logging

import torch

from ._env import env_flag

log = logging.getLogger("nino_fast")
_ERROR: str | None = None
_CPU_ISA: str | None = None  # the vector ISA the loaded CPU kernels were built for

if env_flag("NINO_FAST_DISABLE_EXT", default=False):
    _ERROR = "disabled by NINO_FAST_DISABLE_EXT"
else:
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.nino_fast.*)
    except Exception as exc:  # ImportError/OSError for a missing or ABI-broken .so; a registration clash
        _ERROR = f"{type(exc).__name__}: {exc}"


def cpu_has_avx512() -> bool:
    """Whether this CPU runs AVX-512F (Linux: /proc/cpuinfo; elsewhere torch's own CPU capability probe)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _isa_error(isa: str | None, cpu_has_avx512: bool) -> str | None:
    """Why CPU kernels built for ``isa`` must not run on this CPU (None if they may). setup.py enables AVX-512
    where the build machine has it; on a CPU without it those kernels would die of an illegal instruction, so
    the extension counts as not loaded and the ops go to the next backend."""
    if isa == "avx512" and not cpu_has_avx512:
        return (
            "nino_fast._C was built with AVX-512 kernels but this CPU has no AVX-512; rebuild it here, or with "
            "NINO_FAST_NO_AVX512=1 for AVX2-only machines"
        )
    return None


if _ERROR is None:
    try:
        _CPU_ISA = str(torch.ops.nino_fast._cpu_isa())
    except (AttributeError, RuntimeError):  # an older _C without the op
        _CPU_ISA = "unknown"
    _ERROR = _isa_error(_CPU_ISA, cpu_has_avx512())
if _ERROR is not None:
    log.warning("nino_fast: C++ extension not loaded (%s); using the Triton/reference backends", _ERROR)


def has_ext() -> bool:
    """Whether ``nino_fast._C`` is loaded (its ops are in ``torch.ops.nino_fast``)."""
    return _ERROR is None


def cpu_isa() -> str | None:
    """The vector instruction set of the loaded CPU kernels: "avx512", "avx2" or "scalar" (None if not loaded).
    The results are the same bits for each (every output element is the same FMA sequence)."""
    return _CPU_ISA if has_ext() else None


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
    """Free the CPU kernels' cached output buffers. Large outputs and input gradients of the CPU kernels come from a
    cache of freed buffers (at most 2 GiB or 1/8 of the RAM, the smaller; ``NINO_FAST_CPU_POOL_MB`` sets it, 0
    turns it off), so that a training loop's next step reuses already-mapped pages instead of paging in fresh ones.
    A NiNo step calls this after each pass, so nothing stays cached between steps; after training with the
    ``nino_fast.nn`` layers, call it to give the memory back."""
    if has_ext():
        try:
            torch.ops.nino_fast._cpu_pool_release()
        except (AttributeError, RuntimeError):  # an extension built before the op existed
            pass
