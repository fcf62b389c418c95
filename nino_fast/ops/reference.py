"""Pure-PyTorch specification of the NiNo message-passing ops. Every kernel backend must match these.

Graphs are destination-sorted CSR: the edges into node n are ``rowptr[n]:rowptr[n+1]`` and ``src[e]`` is edge e's
source. E edges, N nodes, C input edge-feature width, D hidden width, T edge types. ``act`` is SiLU.
Optional per-type tables add ``table[etype[e]]`` (how the type embedding of layer 0 folds into any linear map).

film_mean: one GNN layer's modulated (FiLM) message + mean aggregation, per-node terms precomputed::

    [scale_e; shift_e] = W e_e + b (+ table[etype_e])            W: (2D, C), b: (2D,), table: (T, 2D)
    m_e   = scale_e * (node_dst[n] + node_src[src_e]) + shift_e  for e in row n
    out_n = mean_e m_e                                           (0 for a node without in-edges)

  ``node_dst = x @ P_dst^T + b_pre`` and ``node_src = x @ P_src^T`` split the official ``pre([x_dst, x_src])``.

edge_mlp: two to four GEMMs with gathers and activation (the official EdgeMLP, and the output head)::

    h_e   = act(W_a e_e + b_a (+ table[etype_e]) (+ node_src[src_e] + node_dst[dst_e]))   W_a: (D, C)
    out_e = W_b h_e + b_b (+ node_src2[src_e] + node_dst2[dst_e])                        W_b: (D', D)
    out_e = W_c act(out_e) + b_c   if W_c is given;   out_e = W_d act(out_e) + b_d   if W_d   W_c: (D'', D')
    then act if act_out

  The optional layers c and d (a per-edge readout, e.g. NiNo's head after its last edge update) keep every
  intermediate of a tile in the kernel's cache instead of a round trip of an (E, D') tensor through memory.
  Works on any edge list (src, dst): no reduction, so a subset of edges is fine.

edge_film_mean: layer l's edge update fused with layer l+1's message pass; the updated edge state never leaves
the kernel (its output map ``W_1`` is folded into the next encoder's scale and shift halves)::

    h_e   = act(W_a e_e + b_a + table[etype_e] + node_src[src_e] + node_dst[n])        as in edge_mlp
    out_n = mean_e( (W_sc h_e + b_sc) * (msg_dst[n] + msg_src[src_e]) + W_sh h_e + b_sh )

  The shift half is linear in h, so kernels may sum h over the row first: ``sum_e shift = W_sh sum_e h + deg b_sh``.

film_mean and edge_film_mean take an optional ``feat_index`` (E,), a permutation of 0..E-1: CSR edge e reads
``feat[feat_index[e]]`` (``feat`` in the caller's edge order, e.g. that of a PyG ``edge_index``, is then never
copied into CSR order). ``etype`` stays in CSR order; the feature gradient comes back in ``feat``'s order.

The signatures below are the ops' schemas (``torch.library.infer_schema`` of each function equals the schema
registered in csrc/nino_fast.cpp; tests/test_opcheck.py checks it). Every implementation of an op returns
``promote_types(feat.dtype, float32)``: float32 for 16-bit and float32 features, float64 for float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def csr_dst(rowptr: torch.Tensor) -> torch.Tensor:
    """(E,) destination node of every CSR edge."""
    n = rowptr.numel() - 1
    deg = rowptr[1:] - rowptr[:-1]
    return torch.repeat_interleave(torch.arange(n, device=rowptr.device), deg)


def segment_mean(values: Tensor, rowptr: Tensor) -> Tensor:
    """(N, D) mean of ``values`` (E, D) over each CSR row; zero rows for empty segments."""
    n = rowptr.numel() - 1
    out = torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device)
    out.index_add_(0, csr_dst(rowptr), values)
    deg = (rowptr[1:] - rowptr[:-1]).clamp_min(1).to(values.dtype)
    return out / deg.unsqueeze(1)


def csr_feat(feat: Tensor, feat_index: Tensor | None) -> Tensor:
    """The edge features in CSR order: ``feat`` itself, or its rows ``feat_index`` (checked to be a permutation)."""
    if feat_index is None:
        return feat
    check_permutation(feat_index, feat.shape[0])
    return feat.index_select(0, feat_index.long())


def check_permutation(index: Tensor, n: int) -> None:
    """ValueError unless ``index`` is a 1-D integer permutation of 0..n-1 (the ops' ``feat_index``)."""
    if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool or index.numel() != n:
        raise ValueError(
            f"feat_index must be a 1-D integer tensor of E={n} entries, got {index.dtype} {tuple(index.shape)}"
        )
    if n and not (
        int(index.min()) >= 0
        and int(index.max()) < n
        and int(torch.zeros(n, dtype=torch.int32, device=index.device).index_fill_(0, index.long(), 1).sum()) == n
    ):
        raise ValueError(f"feat_index must be a permutation of 0..E-1 (E={n})")


def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` rows (index_select: several times faster than advanced indexing on CPU)."""
    return table.index_select(0, index)


def _affine(feat, weight, bias, etype, table):
    out = F.linear(feat, weight, bias)
    if table is not None:
        out = out + gather(table, etype)
    return out


def film_mean(
    feat: Tensor,
    rowptr: Tensor,
    src: Tensor,
    node_dst: Tensor,
    node_src: Tensor,
    weight: Tensor,
    bias: Tensor,
    etype: Tensor | None = None,
    type_table: Tensor | None = None,
    feat_index: Tensor | None = None,
) -> Tensor:
    """(N, D) mean over in-edges of ``scale * (node_dst[dst] + node_src[src]) + shift``; see module docstring."""
    d = node_dst.shape[1]
    enc = _affine(csr_feat(feat, feat_index), weight, bias, etype, type_table)
    dst = csr_dst(rowptr)
    msg = enc[:, :d] * (gather(node_dst, dst) + gather(node_src, src)) + enc[:, d:]
    return segment_mean(msg, rowptr)


def edge_mlp(
    feat: Tensor,
    src: Tensor,
    dst: Tensor,
    weight_a: Tensor,
    bias_a: Tensor,
    weight_b: Tensor,
    bias_b: Tensor,
    etype: Tensor | None = None,
    type_table: Tensor | None = None,
    node_src: Tensor | None = None,
    node_dst: Tensor | None = None,
    node_src2: Tensor | None = None,
    node_dst2: Tensor | None = None,
    act_out: bool = False,
    weight_c: Tensor | None = None,
    bias_c: Tensor | None = None,
    weight_d: Tensor | None = None,
    bias_d: Tensor | None = None,
) -> Tensor:
    """(E, D_out) ``W_b act(W_a e + b_a + gathers) + b_b (+ gathers)``, then the readout layers c, d if given; see
    module docstring."""
    h = _affine(feat, weight_a, bias_a, etype, type_table)
    if node_src is not None:
        h = h + gather(node_src, src) + gather(node_dst, dst)
    out = F.linear(F.silu(h), weight_b, bias_b)
    if node_src2 is not None:
        out = out + gather(node_src2, src) + gather(node_dst2, dst)
    return readout(out, weight_c, bias_c, weight_d, bias_d, act_out)


def readout(z: Tensor, weight_c=None, bias_c=None, weight_d=None, bias_d=None, act_out: bool = False) -> Tensor:
    """edge_mlp after W_b: its optional layers ``W_c act(z) + b_c``, then ``W_d act(.) + b_d`` (each if given),
    then act if ``act_out``."""
    if (weight_c is None) != (bias_c is None) or (weight_d is None) != (bias_d is None):
        raise ValueError("edge_mlp: weight_c/bias_c (and weight_d/bias_d) go together")
    if weight_d is not None and weight_c is None:
        raise ValueError("edge_mlp: weight_d needs weight_c (the layers come in order)")
    for w, b in ((weight_c, bias_c), (weight_d, bias_d)):
        if w is not None:
            z = F.linear(F.silu(z), w, b)
    return F.silu(z) if act_out else z


def edge_film_mean(
    feat: Tensor,
    rowptr: Tensor,
    src: Tensor,
    weight_a: Tensor,
    bias_a: Tensor,
    etype: Tensor | None,
    type_table: Tensor | None,
    node_src: Tensor,
    node_dst: Tensor,
    msg_dst: Tensor,
    msg_src: Tensor,
    weight_scale: Tensor,
    bias_scale: Tensor,
    weight_shift: Tensor,
    bias_shift: Tensor,
    feat_index: Tensor | None = None,
) -> Tensor:
    """(N, D) fused edge update + next layer's FiLM mean; see module docstring."""
    dst = csr_dst(rowptr)
    feat = csr_feat(feat, feat_index)
    h = F.silu(_affine(feat, weight_a, bias_a, etype, type_table) + gather(node_src, src) + gather(node_dst, dst))
    msg = F.linear(h, weight_scale, bias_scale) * (gather(msg_dst, dst) + gather(msg_src, src)) + F.linear(
        h, weight_shift, bias_shift
    )
    return segment_mean(msg, rowptr)
