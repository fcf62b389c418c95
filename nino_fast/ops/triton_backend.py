"""Triton backend of the NiNo ops: ``torch.ops.nino_fast.triton_{film_mean,edge_mlp,edge_film_mean}``.

Layers (as in Liger-Kernel): ``@triton.jit`` kernels and their host launchers (checks, block sizes, grid) live
in the ``nino_fast.triton_kernels`` package (top-level ``triton_kernels/`` in a checkout); this module wraps
each launcher as a ``torch.library.custom_op`` with a fake implementation, so torch.compile(fullgraph=True)
traces callers without graph breaks, and exposes functions with the signatures of
:mod:`nino_fast.ops.reference`.

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


def _launch_scope(op: str, feat: torch.Tensor):
    """Triton launches on the current CUDA device: make it feat's (multi-GPU processes)."""
    if _KERNELS is None:
        raise RuntimeError(f"nino_fast::triton_{op}: triton is not installed (pip install triton)")
    return torch.cuda.device(feat.device) if feat.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("nino_fast::triton_film_mean", mutates_args=())
def _film_mean_op(
    feat: torch.Tensor,
    rowptr: torch.Tensor,
    src: torch.Tensor,
    node_dst: torch.Tensor,
    node_src: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    etype: torch.Tensor | None = None,
    type_table: torch.Tensor | None = None,
) -> torch.Tensor:
    with _launch_scope("film_mean", feat):
        return _film_mean.film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table)


@_film_mean_op.register_fake
def _(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None):
    return feat.new_empty(rowptr.shape[0] - 1, node_dst.shape[1], dtype=torch.float32)


@torch.library.custom_op("nino_fast::triton_edge_mlp", mutates_args=())
def _edge_mlp_op(
    feat: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    weight_a: torch.Tensor,
    bias_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor,
    etype: torch.Tensor | None = None,
    type_table: torch.Tensor | None = None,
    node_src: torch.Tensor | None = None,
    node_dst: torch.Tensor | None = None,
    node_src2: torch.Tensor | None = None,
    node_dst2: torch.Tensor | None = None,
    act_out: bool = False,
) -> torch.Tensor:
    with _launch_scope("edge_mlp", feat):
        return _edge_mlp.edge_mlp(
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


@_edge_mlp_op.register_fake
def _(
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
):
    return feat.new_empty(feat.shape[0], weight_b.shape[0], dtype=torch.float32)


@torch.library.custom_op("nino_fast::triton_edge_film_mean", mutates_args=())
def _edge_film_mean_op(
    feat: torch.Tensor,
    rowptr: torch.Tensor,
    src: torch.Tensor,
    weight_a: torch.Tensor,
    bias_a: torch.Tensor,
    etype: torch.Tensor | None,
    type_table: torch.Tensor | None,
    node_src: torch.Tensor,
    node_dst: torch.Tensor,
    msg_dst: torch.Tensor,
    msg_src: torch.Tensor,
    weight_scale: torch.Tensor,
    bias_scale: torch.Tensor,
    weight_shift: torch.Tensor,
    bias_shift: torch.Tensor,
) -> torch.Tensor:
    with _launch_scope("edge_film_mean", feat):
        return _edge_film_mean.edge_film_mean(
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


@_edge_film_mean_op.register_fake
def _(
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
):
    return feat.new_empty(rowptr.shape[0] - 1, weight_scale.shape[0], dtype=torch.float32)


# ------------------------------------------------------------ functional API (signatures of ops.reference)
def film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None) -> torch.Tensor:
    """(N, D) float32; spec: :func:`nino_fast.ops.reference.film_mean`."""
    return torch.ops.nino_fast.triton_film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table)


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
    act_out: bool = False,
) -> torch.Tensor:
    """(E, D') float32; spec: :func:`nino_fast.ops.reference.edge_mlp`."""
    return torch.ops.nino_fast.triton_edge_mlp(
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
) -> torch.Tensor:
    """(N, D) float32; spec: :func:`nino_fast.ops.reference.edge_film_mean`."""
    return torch.ops.nino_fast.triton_edge_film_mean(
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
