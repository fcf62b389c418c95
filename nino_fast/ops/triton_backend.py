"""Triton implementation of the NiNo ops: one of the implementations of ``torch.ops.nino_fast.<op>``.

Layers (as in Liger-Kernel): ``@triton.jit`` kernels and their host launchers (checks, block sizes, grid) live
in the ``nino_fast.triton_kernels`` package (top-level ``triton_kernels/`` in a checkout); this module loads them
and gives :data:`LAUNCHERS`, one function per op with the op's arguments, which :mod:`nino_fast.ops.library`
registers as the op's ``triton`` implementation (selected by :mod:`nino_fast.ops.dispatch`). The op's fake and
autograd are the same for every implementation.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``: tests). Float
inputs may be float32 (IEEE dots: matches the reference to ~1e-6), bfloat16 or float16 (tensor cores, fp32
accumulation); outputs are float32.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_kernels():
    """The kernel package, or None without triton. A source checkout that was not pip-installed has no
    ``nino_fast.triton_kernels`` mapping: import ./triton_kernels under that name."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.import_module("nino_fast.triton_kernels")
    except ImportError:
        path = Path(__file__).resolve().parents[2] / "triton_kernels"
        spec = importlib.util.spec_from_file_location(
            "nino_fast.triton_kernels", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None:
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


_KERNELS = _load_kernels()
if _KERNELS is not None:
    from nino_fast.triton_kernels import edge_film_mean as _edge_film_mean
    from nino_fast.triton_kernels import edge_mlp as _edge_mlp
    from nino_fast.triton_kernels import film_mean as _film_mean


def available() -> bool:
    """Triton is importable and there is something to run it on (a CUDA GPU, or the interpreter)."""
    return _KERNELS is not None and (torch.cuda.is_available() or INTERPRET)


def _on_feat_device(launch):
    """``launch`` on feat's CUDA device: Triton launches on the current device (multi-GPU processes)."""

    def run(feat, *args):
        with torch.cuda.device(feat.device) if feat.is_cuda else contextlib.nullcontext():
            return launch(feat, *args)

    return run


# op name -> its Triton launcher (the op's arguments, positionally, in schema order)
LAUNCHERS = (
    {
        "film_mean": _on_feat_device(_film_mean.film_mean),
        "edge_mlp": _on_feat_device(_edge_mlp.edge_mlp),
        "edge_film_mean": _on_feat_device(_edge_film_mean.edge_film_mean),
    }
    if _KERNELS is not None
    else {}
)
