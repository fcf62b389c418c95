"""The one place that picks a backend for the NiNo ops.

Order of preference: CUDA extension -> Triton -> CPU extension -> reference (pure PyTorch), restricted to what is
available for the inputs' device. ``NINO_FAST_BACKEND=reference|cpu|cuda|triton`` (or ``backend=`` per call)
forces one; asking for a backend that is not available raises instead of silently falling back.
"""

from __future__ import annotations

import os

import torch

from .. import _extension
from . import reference

_IMPLS = {"reference": reference}
_DEVICE = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
_PREFERENCE = ("cuda", "triton", "cpu", "reference")


def _register() -> None:
    """Import the kernel backends that are built/installed; none of them is required."""
    if _extension.has_ext():
        from . import ext

        ext.register_fakes()
        if ext.has_kernels("CPU"):
            _IMPLS["cpu"] = ext
        if ext.has_kernels("CUDA"):
            _IMPLS["cuda"] = ext
    # Triton runs on CUDA tensors (or on CPU tensors under its interpreter, for tests): without either, do
    # not import it at all (importing triton costs ~70 MB of RSS in every process).
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return
    try:
        from . import triton_backend
    except ImportError:  # triton not installed
        triton_backend = None
    if triton_backend is not None and triton_backend.available():
        _IMPLS["triton"] = triton_backend
        if triton_backend.INTERPRET:  # Triton's interpreter runs the kernels on CPU tensors (tests)
            _DEVICE["triton"] = ("cuda", "cpu")


_register()
BACKENDS = tuple(b for b in _PREFERENCE if b in _IMPLS)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, best first."""
    kind = torch.device(device).type
    avail = [b for b in BACKENDS if kind in _DEVICE[b]]
    if kind == "cpu" and "triton" in avail and "cpu" in avail:
        # Triton on CPU tensors is the interpreter (tests): correct but very slow, so after the CPU kernels.
        avail.remove("triton")
        avail.insert(avail.index("cpu") + 1, "triton")
    return avail


def resolve(device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """The backend to use on ``device``: ``backend`` if given, else $NINO_FAST_BACKEND, else the best available."""
    want = backend or os.environ.get("NINO_FAST_BACKEND") or None
    avail = available_backends(device)
    if want is None:
        return avail[0]
    if want not in avail:
        raise RuntimeError(f"nino_fast: backend {want!r} is not available on {device} (available: {avail})")
    return want


def _impl(tensor: torch.Tensor, backend: str | None):
    return _IMPLS[resolve(tensor.device, backend)]


def film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None, backend=None):
    """FiLM message + mean aggregation over CSR; spec: :func:`nino_fast.ops.reference.film_mean`."""
    return _impl(feat, backend).film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table)


def edge_mlp(
    feat,
    src,
    dst,
    weight_a,
    bias_a,
    weight_b,
    bias_b,
    etype=None,
    type_table=None,
    node_src=None,
    node_dst=None,
    node_src2=None,
    node_dst2=None,
    act_out=False,
    backend=None,
):
    """Two-GEMM edge MLP with gathers; spec: :func:`nino_fast.ops.reference.edge_mlp`."""
    return _impl(feat, backend).edge_mlp(
        feat,
        src,
        dst,
        weight_a,
        bias_a,
        weight_b,
        bias_b,
        etype,
        type_table,
        node_src,
        node_dst,
        node_src2,
        node_dst2,
        act_out,
    )


def edge_film_mean(
    feat,
    rowptr,
    src,
    weight_a,
    bias_a,
    etype,
    type_table,
    node_src,
    node_dst,
    msg_dst,
    msg_src,
    weight_scale,
    bias_scale,
    weight_shift,
    bias_shift,
    backend=None,
):
    """Edge update fused with the next FiLM mean; spec: :func:`nino_fast.ops.reference.edge_film_mean`."""
    return _impl(feat, backend).edge_film_mean(
        feat,
        rowptr,
        src,
        weight_a,
        bias_a,
        etype,
        type_table,
        node_src,
        node_dst,
        msg_dst,
        msg_src,
        weight_scale,
        bias_scale,
        weight_shift,
        bias_shift,
    )
