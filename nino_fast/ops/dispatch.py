"""The backend switch of the NiNo ops: which implementation of ``torch.ops.nino_fast.<op>`` runs.

Each op is registered once (csrc/nino_fast.cpp, :mod:`nino_fast.ops.library`); the dispatcher picks the device
(CPU / CUDA kernel), and within a device this switch picks the implementation:

    ``reference``  the pure-PyTorch specification (:mod:`nino_fast.ops.reference`), any device
    ``cpu``        the compiled CPU kernels (csrc/cpu), CPU tensors
    ``cuda``       the compiled CUDA kernels (csrc/cuda), CUDA tensors
    ``triton``     the Triton kernels (triton_kernels/), CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``)

Default: the best available for the tensors' device (order: cuda, triton, cpu, reference).
``NINO_FAST_BACKEND=<name>`` forces one for the process, ``with use_backend(name):`` for a block of code (this
thread), ``backend=<name>`` for one call of :func:`film_mean` / :func:`edge_mlp` / :func:`edge_film_mean`. Asking
for a backend that is not available on the device raises instead of silently falling back.

Every implementation is differentiable the same way: the autograd formula is registered on the op itself.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading

import torch

from .. import _extension
from . import reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "edge_film_mean",
    "edge_mlp",
    "film_mean",
    "resolve",
    "selected",
    "use_backend",
]

_DEVICE = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
_PREFERENCE = ("cuda", "triton", "cpu", "reference")
_FUSED_OPS = ("film_mean", "edge_mlp", "edge_film_mean")
_local = threading.local()  # the use_backend() selection of this thread


def _compiled_has(dispatch_key: str) -> bool:
    """Whether the loaded (and usable) extension has kernels of every fused op for ``dispatch_key``."""
    if not _extension.has_ext():
        return False
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return all(has(f"nino_fast::{op}", dispatch_key) for op in _FUSED_OPS)
    except RuntimeError:  # an op's schema is not registered (an older build)
        return False


def _triton():
    """The Triton launcher module, or None. Without a GPU or the interpreter triton is not imported at all
    (importing it costs ~70 MB of RSS in every process)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return None
    try:
        from . import triton_backend
    except ImportError:  # triton not installed
        return None
    if not triton_backend.available():
        return None
    if triton_backend.INTERPRET:  # Triton's interpreter runs the kernels on CPU tensors (tests)
        _DEVICE["triton"] = ("cuda", "cpu")
    return triton_backend


TRITON = _triton()
_HAVE = {
    "reference": True,
    "cpu": _compiled_has("CPU"),
    "cuda": _compiled_has("CUDA"),
    "triton": TRITON is not None,
}
BACKENDS = tuple(b for b in _PREFERENCE if _HAVE[b])


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
    """The backend to use on ``device``: ``backend`` if given, else this thread's :class:`use_backend`, else
    $NINO_FAST_BACKEND, else the best available."""
    want = backend or getattr(_local, "backend", None) or os.environ.get("NINO_FAST_BACKEND") or None
    avail = available_backends(device)
    if want is None:
        return avail[0]
    if want not in avail:
        raise RuntimeError(f"nino_fast: backend {want!r} is not available on {device} (available: {avail})")
    return want


def selected(device_type: str) -> str:
    """The backend the ops' kernels run on ``device_type`` now (what :mod:`nino_fast.ops.library` reads)."""
    return resolve(device_type)


class use_backend:  # noqa: N801 (a context manager used like a function, as torch.no_grad)
    """``with use_backend("triton"): ...`` runs the ops of the block (this thread) on that backend; None restores
    the default. It must be active where the ops *run*: around a compiled function's call, not inside it."""

    def __init__(self, backend: str | None):
        if backend is not None and backend not in _DEVICE:
            raise ValueError(f"nino_fast: unknown backend {backend!r} (one of {tuple(_DEVICE)})")
        self.backend, self.prev = backend, None

    def __enter__(self):
        self.prev = getattr(_local, "backend", None)
        _local.backend = self.backend
        return self

    def __exit__(self, *exc):
        _local.backend = self.prev
        return False


def _front(name: str):
    """``torch.ops.nino_fast.<name>`` with a ``backend=`` keyword for one call; signature and docs of the spec."""
    spec = getattr(reference, name)

    @functools.wraps(spec)
    def call(*args, backend: str | None = None, **kwargs):
        op = getattr(torch.ops.nino_fast, name)
        if backend is None:
            return op(*args, **kwargs)
        device = args[0].device
        choice = resolve(device, backend)
        if torch.compiler.is_compiling():
            # A traced region cannot switch implementations around one op call (the switch is read when the
            # graph runs): the choice must already be in effect there.
            if choice != resolve(device):
                raise RuntimeError(
                    f"nino_fast::{name}: backend={backend!r} inside torch.compile differs from the backend in "
                    f"effect ({resolve(device)!r}); wrap the compiled call in use_backend({backend!r}) instead"
                )
            return op(*args, **kwargs)
        with use_backend(choice):
            return op(*args, **kwargs)

    sig = inspect.signature(spec)
    kw = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str | None")
    call.__signature__ = sig.replace(parameters=[*sig.parameters.values(), kw])
    call.__doc__ = f"``torch.ops.nino_fast.{name}`` on the selected backend; spec:\n\n{spec.__doc__}"
    return call


film_mean = _front("film_mean")
edge_mlp = _front("edge_mlp")
edge_film_mean = _front("edge_film_mean")
