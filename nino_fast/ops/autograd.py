"""Autograd for the fused NiNo ops: forward on any kernel backend, analytic backward (fused CPU kernels, or
PyTorch ops).

``film_mean``, ``edge_mlp`` and ``edge_film_mean`` here take the same arguments as :mod:`nino_fast.ops.dispatch`
and return the same values; they are differentiable with respect to every floating-point input. Without
gradients to compute they *are* the dispatch calls (no autograd bookkeeping at all).

Forward: the dispatched kernel (CPU extension, CUDA extension or Triton), which never writes the per-edge
intermediates. Backward: closed-form gradients (below), written with index_select / index_add_ / GEMMs. They
recompute the per-edge pre-activations from the saved *inputs* (one GEMM each) instead of storing E x D
activations in the forward, so training memory stays that of the inputs. Not recomputation through the
reference ops: no autograd graph is built in the backward. No double backward (``once_differentiable``).

On float32 CPU tensors with the extension loaded, each backward is one fused kernel instead
(``csrc/cpu/{film_mean,edge_mlp,edge_film_mean}_backward_kernel.cpp``): the same formulas per tile of edges in
L1 (recompute, SiLU derivatives, the weight gradients as register-blocked outer products), only the per-edge
rows that a node or type gradient needs written out and scattered by a column-parallel pass; deterministic
(row tasks / fixed chunks summed in order, no atomics) and independent of the thread count. Everywhere else
(CUDA, Triton, float64: gradcheck) the PyTorch formulas below run; ``with fused_backward(False)`` forces them
(tests/test_fused_backward.py checks the kernels against them and against float64).

Notation as in :mod:`nino_fast.ops.reference`; ``gm_e = gout[dst_e] / deg[dst_e]`` is the gradient reaching edge
e's message through the mean, ``s'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))`` is SiLU's derivative.

film_mean, ``enc = W f + b + T[t]`` split into scale / shift, ``g = node_dst[dst] + node_src[src]``::

    d enc        = [gm * g, gm]                       dW = d enc^T f, db = sum_e d enc, dT = index_add(t, d enc)
    d f          = d enc @ W
    d node_dst_n = gout_n * mean_{e in n} scale_e     (a row mean: no per-edge scatter)
    d node_src   = index_add(src, gm * scale)

edge_mlp, ``a = W_a f + b_a + T[t] + ns[src] + nd[dst]``, ``h = s(a)``, ``z = W_b h + b_b + ns2[src] + nd2[dst]``::

    d z  = gout (* s'(z) if act_out)                  dW_b = d z^T h, db_b = sum d z, d ns2/nd2 = index_add(d z)
    d a  = (d z @ W_b) * s'(a)                        dW_a = d a^T f, ..., d ns/nd = index_add(src/dst, d a)

edge_film_mean, ``a, h`` as edge_mlp, ``sc = W_sc h + b_sc``, ``g = msg_dst[dst] + msg_src[src]``::

    d sc = gm * g ; d sh = gm                          dW_sc = d sc^T h, dW_sh = d sh^T h, biases: sums
    d h  = d sc @ W_sc + gm @ W_sh ; d a = d h * s'(a) then as edge_mlp (node_dst: a row sum)
    d msg_dst_n = gout_n * mean_{e in n} sc_e ; d msg_src = index_add(src, gm * sc)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _extension
from .._env import env_flag
from . import dispatch
from .reference import csr_dst
from .segment import segment_mean_csr

__all__ = ["edge_film_mean", "edge_mlp", "film_mean", "fused_backward"]

_FUSED_BACKWARD = env_flag("NINO_FAST_FUSED_BACKWARD", default=True)


class fused_backward:  # noqa: N801 (a context manager used like a function, as torch.no_grad)
    """Whether the backward passes may use the fused CPU kernels (``csrc/cpu/*_backward_kernel.cpp``) where
    they apply (float32 CPU tensors, the extension loaded); otherwise, and always for other devices and
    dtypes, the PyTorch formulas below. ``with fused_backward(False): ...`` turns them off for the block (the
    benchmark and the tests compare the two); ``NINO_FAST_FUSED_BACKWARD=0`` in the environment, for the
    process."""

    def __init__(self, enabled: bool):
        self.enabled, self.prev = bool(enabled), None

    def __enter__(self):
        global _FUSED_BACKWARD
        self.prev, _FUSED_BACKWARD = _FUSED_BACKWARD, self.enabled
        return self

    def __exit__(self, *exc):
        global _FUSED_BACKWARD
        _FUSED_BACKWARD = self.prev
        return False


def _fused_cpu(op: str, tensors, indices) -> bool:
    """Whether the fused CPU backward kernel ``op`` applies: enabled, the extension has it, every floating
    tensor is float32 on the CPU and the edge indices are int32."""
    if not _FUSED_BACKWARD or not _extension.has_ext():
        return False
    if not all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors):
        return False
    if not all(i.device.type == "cpu" and i.dtype == torch.int32 for i in indices):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nino_fast::{op}", "CPU")
    except RuntimeError:  # an older build without the op's schema
        return False


def _silu_back(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``grad * s'(a)`` in one fused pass (ATen's own SiLU backward kernel)."""
    return torch.ops.aten.silu_backward(grad, a)


def _scatter(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """(size, D) sums of ``values`` rows by ``index`` (deterministic on CPU)."""
    return values.new_zeros(size, values.shape[1]).index_add_(0, index.long(), values)


def _row_mean(values: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """(N, D) mean over each CSR row (the extension's ``segment_mean_csr`` where it has a kernel)."""
    return segment_mean_csr(values.contiguous(), rowptr)


def _deg(rowptr: torch.Tensor, dtype) -> torch.Tensor:
    """(N, 1) in-degrees."""
    return (rowptr[1:] - rowptr[:-1]).unsqueeze(1).to(dtype)


def _pre(feat, weight, bias, etype=None, table=None, ns=None, src=None, nd=None, dst=None) -> torch.Tensor:
    """``W f + b (+ T[t]) (+ ns[src] + nd[dst])``, the gathers added in place (no extra E x D temporaries)."""
    out = F.linear(feat, weight, bias)
    if table is not None:
        out += table.index_select(0, etype)
    if ns is not None:
        out += ns.index_select(0, src)
        out += nd.index_select(0, dst)
    return out


def _type_counts(dst: torch.Tensor, etype: torch.Tensor, n: int, n_types: int, dtype) -> torch.Tensor:
    """(N, T) number of in-edges of each type per node (row sums by type, for the shift half's type table)."""
    counts = torch.zeros(n * n_types, dtype=dtype, device=dst.device)
    counts.index_add_(0, dst * n_types + etype, torch.ones(1, dtype=dtype, device=dst.device).expand(dst.numel()))
    return counts.view(n, n_types)


def _grads_affine(need, grad, feat, weight, etype, table):
    """(d feat, d weight, d bias, d table) of ``W f + b + T[t]`` for output gradient ``grad`` (E, out)."""
    d_feat = grad @ weight if need[0] else None
    d_w = grad.t() @ feat if need[1] else None
    d_b = grad.sum(0) if need[2] else None
    d_t = _scatter(etype, grad, table.shape[0]) if table is not None and need[3] else None
    return d_feat, d_w, d_b, d_t


def _pick(need, n_inputs: int, positions, grads) -> tuple:
    """A backward's return value from a fused kernel's gradients: ``grads[k]`` is the gradient of input
    ``positions[k]``; None where it is not needed (or not an input with a gradient)."""
    out = [None] * n_inputs
    for i, g in zip(positions, grads, strict=True):
        out[i] = g if need[i] else None
    return tuple(out)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class FilmMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table, backend):
        ctx.save_for_backward(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table)
        return dispatch.film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        feat, rowptr, src, node_dst, node_src, weight, bias, etype, table = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _fused_cpu("film_mean_backward", (gout, feat, node_dst, node_src, weight, bias, table), (src,)):
            g = torch.ops.nino_fast.film_mean_backward(
                gout.contiguous(), feat, rowptr, src, node_dst, node_src, weight, bias, etype, table, need[0]
            )
            return _pick(need, 10, (0, 3, 4, 5, 6, 8), g)
        n, d = node_dst.shape
        dst, src_l, deg = csr_dst(rowptr), src.long(), _deg(rowptr, feat.dtype)
        gn = gout.to(feat.dtype) / deg.clamp_min(1)  # (N, D): the mean's gradient, per edge of row n
        gm = gn.index_select(0, dst)  # (E, D)
        scale = _pre(feat, weight[:d], bias[:d], etype, None if table is None else table[:, :d])
        g = node_dst.index_select(0, dst).add_(node_src.index_select(0, src_l))
        dsc = gm * g  # gradient of the scale half; the shift half's is gm, whose row sums are N-level
        d_feat = d_w = d_b = d_t = None
        if need[0]:
            d_feat = torch.addmm((gn @ weight[d:]).index_select(0, dst), dsc, weight[:d])
        if need[5]:
            d_w = torch.cat((dsc.t() @ feat, gn.t() @ (_row_mean(feat, rowptr) * deg)))
        if need[6]:
            d_b = torch.cat((dsc.sum(0), (gn * deg).sum(0)))
        if table is not None and need[8]:
            counts = _type_counts(dst, etype, n, table.shape[0], gn.dtype)
            d_t = torch.cat((_scatter(etype, dsc, table.shape[0]), counts.t() @ gn), 1)
        d_nd = gout * _row_mean(scale, rowptr) if need[3] else None
        d_ns = _scatter(src_l, gm.mul_(scale), node_src.shape[0]) if need[4] else None
        return d_feat, None, None, d_nd, d_ns, d_w, d_b, None, d_t, None


class EdgeMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, src, dst, wa, ba, wb, bb, etype, table, ns, nd, ns2, nd2, act_out, backend):
        ctx.save_for_backward(feat, src, dst, wa, ba, wb, bb, etype, table, ns, nd, ns2, nd2)
        ctx.act_out = act_out
        return dispatch.edge_mlp(feat, src, dst, wa, ba, wb, bb, etype, table, ns, nd, ns2, nd2, act_out, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        feat, src, dst, wa, ba, wb, bb, etype, table, ns, nd, ns2, nd2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _fused_cpu("edge_mlp_backward", (gout, feat, wa, ba, wb, bb, table, ns, nd, ns2, nd2), (src, dst)):
            g = torch.ops.nino_fast.edge_mlp_backward(
                gout.contiguous(), feat, src, dst, wa, ba, wb, bb, etype, table, ns, nd, ns2, nd2, ctx.act_out, need[0]
            )
            return _pick(need, 15, (0, 3, 4, 5, 6, 8, 9, 10, 11, 12), g)
        src_l, dst_l = src.long(), dst.long()
        a = _pre(feat, wa, ba, etype, table, ns, src_l, nd, dst_l)
        h = F.silu(a)
        gz = gout.to(feat.dtype)
        if ctx.act_out:
            gz = _silu_back(gz, _pre(h, wb, bb, None, None, ns2, src_l, nd2, dst_l))
        d_wb = gz.t() @ h if need[5] else None
        del h
        d_bb = gz.sum(0) if need[6] else None
        d_ns2 = _scatter(src_l, gz, ns2.shape[0]) if ns2 is not None and need[11] else None
        d_nd2 = _scatter(dst_l, gz, nd2.shape[0]) if nd2 is not None and need[12] else None
        da = _silu_back(gz @ wb, a)
        d_feat, d_wa, d_ba, d_t = _grads_affine((need[0], need[3], need[4], need[8]), da, feat, wa, etype, table)
        d_ns = _scatter(src_l, da, ns.shape[0]) if ns is not None and need[9] else None
        d_nd = _scatter(dst_l, da, nd.shape[0]) if nd is not None and need[10] else None
        return d_feat, None, None, d_wa, d_ba, d_wb, d_bb, None, d_t, d_ns, d_nd, d_ns2, d_nd2, None, None


class EdgeFilmMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, rowptr, src, wa, ba, etype, table, ns, nd, md, ms, wsc, bsc, wsh, bsh, backend):
        ctx.save_for_backward(feat, rowptr, src, wa, ba, etype, table, ns, nd, md, ms, wsc, bsc, wsh, bsh)
        args = (feat, rowptr, src, wa, ba, etype, table, ns, nd, md, ms, wsc, bsc, wsh, bsh, backend)
        return dispatch.edge_film_mean(*args)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        feat, rowptr, src, wa, ba, etype, table, ns, nd, md, ms, wsc, bsc, wsh, bsh = ctx.saved_tensors
        need = ctx.needs_input_grad
        floats = (gout, feat, wa, ba, table, ns, nd, md, ms, wsc, bsc, wsh, bsh)
        if _fused_cpu("edge_film_mean_backward", floats, (src,)):
            g = torch.ops.nino_fast.edge_film_mean_backward(
                gout.contiguous(), feat, rowptr, src, wa, ba, etype, table, ns, nd, md, ms, wsc, bsc, wsh, bsh, need[0]
            )
            return _pick(need, 16, (0, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14), g)
        dst, src_l, deg = csr_dst(rowptr), src.long(), _deg(rowptr, feat.dtype)
        gn = gout.to(feat.dtype) / deg.clamp_min(1)
        gm = gn.index_select(0, dst)
        a = _pre(feat, wa, ba, etype, table, ns, src_l, nd, dst)
        h = F.silu(a)
        sc = F.linear(h, wsc, bsc)
        dsc = gm * md.index_select(0, dst).add_(ms.index_select(0, src_l))
        d_wsc = dsc.t() @ h if need[11] else None
        d_bsc = dsc.sum(0) if need[12] else None
        # the shift half is linear in h and its gradient is gm: sums over a row first, then N-level products
        d_wsh = gn.t() @ (_row_mean(h, rowptr) * deg) if need[13] else None
        del h
        d_bsh = (gn * deg).sum(0) if need[14] else None
        d_md = gout * _row_mean(sc, rowptr) if need[9] else None
        d_ms = _scatter(src_l, gm.mul_(sc), ms.shape[0]) if need[10] else None
        del gm, sc
        da = _silu_back(torch.addmm((gn @ wsh).index_select(0, dst), dsc, wsc), a)
        d_feat, d_wa, d_ba, d_t = _grads_affine((need[0], need[3], need[4], need[6]), da, feat, wa, etype, table)
        d_ns = _scatter(src_l, da, ns.shape[0]) if need[7] else None
        d_nd = _row_mean(da, rowptr) * deg if need[8] else None
        return (d_feat, None, None, d_wa, d_ba, None, d_t, d_ns, d_nd, d_md, d_ms, d_wsc, d_bsc, d_wsh, d_bsh, None)


def film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None, backend=None):
    """Differentiable :func:`nino_fast.ops.dispatch.film_mean`: (N, D)."""
    if not _needs_grad(feat, node_dst, node_src, weight, bias, type_table):
        return dispatch.film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table, backend)
    return FilmMean.apply(feat, rowptr, src, node_dst, node_src, weight, bias, etype, type_table, backend)


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
    """Differentiable :func:`nino_fast.ops.dispatch.edge_mlp`: (E, D')."""
    args = (feat, src, dst, weight_a, bias_a, weight_b, bias_b, etype, type_table)
    args += (node_src, node_dst, node_src2, node_dst2, act_out, backend)
    if not _needs_grad(feat, weight_a, bias_a, weight_b, bias_b, type_table, node_src, node_dst, node_src2, node_dst2):
        return dispatch.edge_mlp(*args)
    return EdgeMLP.apply(*args)


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
    """Differentiable :func:`nino_fast.ops.dispatch.edge_film_mean`: (N, D)."""
    args = (feat, rowptr, src, weight_a, bias_a, etype, type_table, node_src, node_dst, msg_dst, msg_src)
    args += (weight_scale, bias_scale, weight_shift, bias_shift, backend)
    if not _needs_grad(*args[:-1]):
        return dispatch.edge_film_mean(*args)
    return EdgeFilmMean.apply(*args)
