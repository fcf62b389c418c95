"""The C++/CUDA extension backend: ``torch.ops.nino_fast.*`` plus their fake (meta) implementations.

Schemas live in csrc/nino_fast.cpp; CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda. The fake implementations
give torch.compile / export the output shapes without running a kernel, so the ops trace without graph breaks.
"""

from __future__ import annotations

import torch

from .._extension import has_ext

_REGISTERED = False
OPS = ("film_mean", "edge_mlp", "edge_film_mean")


def has_kernels(dispatch_key: str) -> bool:
    """Whether the loaded extension has kernels of every op for ``dispatch_key`` ('CPU' or 'CUDA')."""
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nino_fast::{op}", dispatch_key) for op in OPS)
    except RuntimeError:  # an op's schema is not registered
        return False


def register_fakes() -> None:
    global _REGISTERED
    if _REGISTERED or not has_ext():
        return

    @torch.library.register_fake("nino_fast::film_mean")
    def _(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None):
        return feat.new_empty(rowptr.shape[0] - 1, node_dst.shape[1], dtype=torch.float32)

    @torch.library.register_fake("nino_fast::edge_mlp")
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

    @torch.library.register_fake("nino_fast::edge_film_mean")
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

    _REGISTERED = True


def film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None):
    return torch.ops.nino_fast.film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table)


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
):
    return torch.ops.nino_fast.edge_mlp(
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
):
    return torch.ops.nino_fast.edge_film_mean(
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
