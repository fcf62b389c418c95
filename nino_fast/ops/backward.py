"""Backward of the fused NiNo ops: closed-form gradients, returned by argument name.

:mod:`nino_fast.ops.library` registers :func:`GRADIENTS` ``[op]`` as the autograd formula of ``nino_fast::<op>``
(``torch.library.register_autograd``). Each takes the op's arguments as a dict ``a`` (schema names), the names
whose gradient is wanted ``need`` and the output gradient ``gout``, and returns ``{argument name: gradient}``.

The formulas recompute the per-edge pre-activations from the saved *inputs* (one GEMM each) instead of storing
E x D activations in the forward, so training memory stays that of the inputs. No autograd graph is built in the
backward, and there is no double backward.

On float32 CPU tensors with the extension loaded, each backward is one fused kernel instead, itself an op
(``nino_fast::<op>_backward``, ``csrc/cpu/*_backward_kernel.cpp``): the same formulas per tile of edges in L1
(recompute, SiLU derivatives, the weight gradients as register-blocked outer products), only the per-edge rows that
a node or type gradient needs written out and scattered by a column-parallel pass; deterministic (row tasks / fixed
chunks summed in order, no atomics) and independent of the thread count. Everywhere else (CUDA, Triton, float64:
gradcheck) the PyTorch formulas below run; ``with fused_backward(False)`` forces them (tests/test_fused_backward.py
checks the kernels against them and against float64).

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

from .. import _extension
from .._env import env_flag
from .reference import csr_dst, csr_feat, readout
from .segment import segment_mean_csr as _segment_mean

__all__ = ["GRADIENTS", "fused_backward", "fused_cpu"]

_FUSED_BACKWARD = env_flag("NINO_FAST_FUSED_BACKWARD", default=True)

# What each fused backward kernel returns, in order (csrc/nino_fast.cpp documents the same lists): the name of
# the forward argument each gradient belongs to. The one place where the kernels' output positions are written.
FUSED_OUTPUTS = {
    "film_mean": tuple("feat node_dst node_src weight bias type_table".split()),
    "edge_mlp": tuple("feat weight_a bias_a weight_b bias_b type_table node_src node_dst node_src2 node_dst2".split()),
    "edge_film_mean": tuple(
        "feat weight_a bias_a type_table node_src node_dst msg_dst msg_src weight_scale bias_scale weight_shift "
        "bias_shift".split()
    ),
}
# The integer (index) arguments of each op: the fused kernels take int32 or int64 (converted to int32).
_INDEX_ARGS = {"film_mean": ("src",), "edge_mlp": ("src", "dst"), "edge_film_mean": ("src",)}


class fused_backward:  # noqa: N801 (a context manager used like a function, as torch.no_grad)
    """Whether the backward passes may use the fused CPU kernels (``csrc/cpu/*_backward_kernel.cpp``) where
    they apply (float32 CPU tensors, the extension loaded); otherwise, and always for other devices and
    dtypes, the PyTorch formulas. ``with fused_backward(False): ...`` turns them off for the block (the
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


def fused_enabled() -> bool:
    """The current state of :class:`fused_backward` (the environment's default outside any block)."""
    return _FUSED_BACKWARD


def fused_cpu(op: str, tensors, indices) -> bool:
    """Whether the fused CPU backward kernel ``op`` applies: enabled, the extension has it, every floating
    tensor is float32 on the CPU and the edge indices int32 or int64."""
    if not _FUSED_BACKWARD or not _extension.has_ext():
        return False
    if not all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors):
        return False
    if not all(i.device.type == "cpu" and i.dtype in (torch.int32, torch.int64) for i in indices):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nino_fast::{op}", "CPU")
    except RuntimeError:  # an older build without the op's schema
        return False


def _fused(op: str, a: dict, need: set, gout: torch.Tensor):
    """The gradients by the fused CPU kernel ``<op>_backward`` as ``{name: gradient}``, or None where it does
    not apply. The kernel's arguments are the forward's, after ``grad_out``, then ``act_out`` / ``need_feat``."""
    floats = [gout] + [a[n] for n in FUSED_OUTPUTS[op] if n != "feat"] + [a["feat"]]
    if not fused_cpu(f"{op}_backward", floats, [a[n] for n in _INDEX_ARGS[op]]):
        return None
    kernel = getattr(torch.ops.nino_fast, f"{op}_backward")
    names = [x.name for x in kernel.default._schema.arguments]
    args = {**a, "grad_out": gout.contiguous(), "need_feat": "feat" in need}
    grads = kernel(*(args[n] for n in names))
    return dict(zip(FUSED_OUTPUTS[op], grads, strict=True))


# ---------------------------------------------------------------------------------------------- shared pieces
def _silu_back(grad: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``grad * s'(a)`` in one fused pass (ATen's own SiLU backward kernel)."""
    return torch.ops.aten.silu_backward(grad, a)


def _scatter(index: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """(size, D) sums of ``values`` rows by ``index`` (deterministic on CPU)."""
    return values.new_zeros(size, values.shape[1]).index_add_(0, index.long(), values)


def _row_mean(values: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """(N, D) mean over each CSR row (the extension's ``segment_mean_csr`` where it has a kernel)."""
    return _segment_mean(values.contiguous(), rowptr)


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


def _in_feat_order(a: dict, g: dict) -> dict:
    """``g`` with the feature gradient (computed in CSR order) put back in ``feat``'s row order when the op read
    ``feat`` through its ``feat_index`` permutation."""
    index = a.get("feat_index")
    if index is not None and "feat" in g:
        g["feat"] = torch.empty_like(g["feat"]).index_copy_(0, index.long(), g["feat"])
    return g


def _type_counts(dst: torch.Tensor, etype: torch.Tensor, n: int, n_types: int, dtype) -> torch.Tensor:
    """(N, T) number of in-edges of each type per node (row sums by type, for the shift half's type table)."""
    counts = torch.zeros(n * n_types, dtype=dtype, device=dst.device)
    counts.index_add_(0, dst * n_types + etype, torch.ones(1, dtype=dtype, device=dst.device).expand(dst.numel()))
    return counts.view(n, n_types)


def _affine(need: set, grad, feat, weight, etype, table, names: tuple) -> dict:
    """Gradients of ``W f + b + T[t]`` for output gradient ``grad`` (E, out), under the op's ``names`` of
    (feat, weight, bias, table)."""
    nf, nw, nb, nt = names
    out = {}
    if nf in need:
        out[nf] = grad @ weight
    if nw in need:
        out[nw] = grad.t() @ feat
    if nb in need:
        out[nb] = grad.sum(0)
    if table is not None and nt in need:
        out[nt] = _scatter(etype, grad, table.shape[0])
    return out


# ---------------------------------------------------------------------------------------------- the formulas
def film_mean(a: dict, need: set, gout: torch.Tensor) -> dict:
    fused = _fused("film_mean", a, need, gout)
    if fused is not None:
        return fused
    rowptr, weight, table, etype = a["rowptr"], a["weight"], a["type_table"], a["etype"]
    feat = csr_feat(a["feat"], a["feat_index"])
    n, d = a["node_dst"].shape
    dst, src, deg = csr_dst(rowptr), a["src"].long(), _deg(rowptr, feat.dtype)
    gn = gout.to(feat.dtype) / deg.clamp_min(1)  # (N, D): the mean's gradient, per edge of row n
    gm = gn.index_select(0, dst)  # (E, D)
    scale = _pre(feat, weight[:d], a["bias"][:d], etype, None if table is None else table[:, :d])
    dsc = gm * a["node_dst"].index_select(0, dst).add_(a["node_src"].index_select(0, src))
    # the shift half's gradient is gm, whose row sums are N-level: its products need no (E, D) tensor
    g = {}
    if "feat" in need:
        g["feat"] = torch.addmm((gn @ weight[d:]).index_select(0, dst), dsc, weight[:d])
    if "weight" in need:
        g["weight"] = torch.cat((dsc.t() @ feat, gn.t() @ (_row_mean(feat, rowptr) * deg)))
    if "bias" in need:
        g["bias"] = torch.cat((dsc.sum(0), (gn * deg).sum(0)))
    if table is not None and "type_table" in need:
        counts = _type_counts(dst, etype, n, table.shape[0], gn.dtype)
        g["type_table"] = torch.cat((_scatter(etype, dsc, table.shape[0]), counts.t() @ gn), 1)
    if "node_dst" in need:
        g["node_dst"] = gout * _row_mean(scale, rowptr)
    if "node_src" in need:
        g["node_src"] = _scatter(src, gm.mul_(scale), a["node_src"].shape[0])
    return _in_feat_order(a, g)


_READOUT = ("weight_c", "bias_c", "weight_d", "bias_d")


def _edge_mlp_readout(a: dict, need: set, gout: torch.Tensor) -> dict:
    """edge_mlp with readout layers: their gradients by autograd over :func:`reference.readout` on the two-layer
    output z (recomputed by the op), z's gradient through the two-layer formula below. The readout's matmuls are
    ATen's: bitwise repeatable at a fixed thread count, not across thread counts (the fused kernels are)."""
    base = {**a, **dict.fromkeys(_READOUT), "act_out": False}
    op = torch.ops.nino_fast.edge_mlp.default
    with torch.no_grad():
        z = op(*(base[x.name] for x in op._schema.arguments))
    with torch.enable_grad():
        zr = z.detach().requires_grad_()
        layers = {n: a[n].detach().requires_grad_() for n in _READOUT if a[n] is not None}
        out = readout(zr, *(layers.get(n) for n in _READOUT), act_out=a["act_out"])
        wanted = [n for n in layers if n in need]
        got = torch.autograd.grad(out, [zr, *(layers[n] for n in wanted)], gout.to(out.dtype))
    g = edge_mlp(base, need, got[0])
    g.update(zip(wanted, got[1:], strict=True))
    return g


def edge_mlp(a: dict, need: set, gout: torch.Tensor) -> dict:
    if a["weight_c"] is not None:
        return _edge_mlp_readout(a, need, gout)
    fused = _fused("edge_mlp", a, need, gout)
    if fused is not None:
        return fused
    feat, src, dst = a["feat"], a["src"].long(), a["dst"].long()
    ns, nd, ns2, nd2 = a["node_src"], a["node_dst"], a["node_src2"], a["node_dst2"]
    pre = _pre(feat, a["weight_a"], a["bias_a"], a["etype"], a["type_table"], ns, src, nd, dst)
    h = F.silu(pre)
    gz = gout.to(feat.dtype)
    if a["act_out"]:
        gz = _silu_back(gz, _pre(h, a["weight_b"], a["bias_b"], None, None, ns2, src, nd2, dst))
    g = {}
    if "weight_b" in need:
        g["weight_b"] = gz.t() @ h
    del h
    if "bias_b" in need:
        g["bias_b"] = gz.sum(0)
    if ns2 is not None and "node_src2" in need:
        g["node_src2"] = _scatter(src, gz, ns2.shape[0])
    if nd2 is not None and "node_dst2" in need:
        g["node_dst2"] = _scatter(dst, gz, nd2.shape[0])
    da = _silu_back(gz @ a["weight_b"], pre)
    names = ("feat", "weight_a", "bias_a", "type_table")
    g.update(_affine(need, da, feat, a["weight_a"], a["etype"], a["type_table"], names))
    if ns is not None and "node_src" in need:
        g["node_src"] = _scatter(src, da, ns.shape[0])
    if nd is not None and "node_dst" in need:
        g["node_dst"] = _scatter(dst, da, nd.shape[0])
    return g


def edge_film_mean(a: dict, need: set, gout: torch.Tensor) -> dict:
    fused = _fused("edge_film_mean", a, need, gout)
    if fused is not None:
        return fused
    rowptr, ms = a["rowptr"], a["msg_src"]
    feat = csr_feat(a["feat"], a["feat_index"])
    dst, src, deg = csr_dst(rowptr), a["src"].long(), _deg(rowptr, feat.dtype)
    gn = gout.to(feat.dtype) / deg.clamp_min(1)
    gm = gn.index_select(0, dst)
    pre = _pre(feat, a["weight_a"], a["bias_a"], a["etype"], a["type_table"], a["node_src"], src, a["node_dst"], dst)
    h = F.silu(pre)
    sc = F.linear(h, a["weight_scale"], a["bias_scale"])
    dsc = gm * a["msg_dst"].index_select(0, dst).add_(ms.index_select(0, src))
    g = {}
    if "weight_scale" in need:
        g["weight_scale"] = dsc.t() @ h
    if "bias_scale" in need:
        g["bias_scale"] = dsc.sum(0)
    # the shift half is linear in h and its gradient is gm: sums over a row first, then N-level products
    if "weight_shift" in need:
        g["weight_shift"] = gn.t() @ (_row_mean(h, rowptr) * deg)
    del h
    if "bias_shift" in need:
        g["bias_shift"] = (gn * deg).sum(0)
    if "msg_dst" in need:
        g["msg_dst"] = gout * _row_mean(sc, rowptr)
    if "msg_src" in need:
        g["msg_src"] = _scatter(src, gm.mul_(sc), ms.shape[0])
    del gm, sc
    da = _silu_back(torch.addmm((gn @ a["weight_shift"]).index_select(0, dst), dsc, a["weight_scale"]), pre)
    names = ("feat", "weight_a", "bias_a", "type_table")
    g.update(_affine(need, da, feat, a["weight_a"], a["etype"], a["type_table"], names))
    if "node_src" in need:
        g["node_src"] = _scatter(src, da, a["node_src"].shape[0])
    if "node_dst" in need:
        g["node_dst"] = _row_mean(da, rowptr) * deg
    return _in_feat_order(a, g)


def segment_mean_csr(a: dict, need: set, gout: torch.Tensor) -> dict:
    """``d src_e = gout[dst_e] / deg[dst_e]``."""
    rowptr = a["rowptr"]
    gn = gout / _deg(rowptr, gout.dtype).clamp_min(1)
    return {"src": gn.index_select(0, csr_dst(rowptr))} if "src" in need else {}


GRADIENTS = {
    "film_mean": film_mean,
    "edge_mlp": edge_mlp,
    "edge_film_mean": edge_film_mean,
    "segment_mean_csr": segment_mean_csr,
}
