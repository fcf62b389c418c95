"""The folded inference plan: the NiNo GNN step with every exact algebraic shortcut, on three fused ops.

For the official architecture (3 layers, edge updates after layers 0 and 1, linear input layer, SiLU):

1. ``pre([x_dst, x_src])``, ``lin_s``, ``lin_t`` are per-node projections, gathered per edge (no 2D->D GEMM).
2. Layer 2's message pass only feeds its node update, which no prediction reads: it is skipped.
3. Layer-0 edge features are ``W_p r + b_p + T[type]`` with ``r`` the raw history (width F*ctx, 5 for
   transformers): every linear map applied to them folds into a (out, F*ctx) matrix plus a per-type table.
4. ``e^{l+1} = W_1 h + b_1`` is followed only by linear maps (the next encoder, the next ``lin_e``, the head's first
   layer): ``W_1`` folds into them, so edge states are never materialised; layer 1's edge state ``h0`` is
   recomputed from ``r`` where needed (a (D, F*ctx) GEMM: cheaper than storing E x D floats).
5. Only the horizon-k row of the head is computed, and only on edges that carry parameters.

Ops (see :mod:`nino_fast.ops.reference` for their exact maths): ``film_mean`` (layer 0),
``edge_film_mean`` (edge update 0 fused with layer 1's message), ``edge_mlp`` with its readout layers (edge update 1
and the head in one pass on CPU; two calls on GPUs, whose kernels run two layers).
Folded weights are formed in float64 and rounded once to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .graph.pieces import RowRange
from .ops import dispatch

HEAD_CHUNK = 1 << 16  # edges per head call on CPU: bounds the gathered copies of a sparse head (the layers run fused)
HEAD_CHUNK_GPU = 1 << 22  # on a GPU: 4M edges (a 2 GiB fp32 intermediate); small chunks were launch-bound
DENSE_HEAD = 0.9  # run the head on all edges of a range (no gathers) when at least this fraction of them is used


@dataclass
class Folded:
    W0: torch.Tensor  # (2D, c) conv0 encoder o edge_proj
    b0: torch.Tensor
    T0: torch.Tensor | None  # (types, 2D)
    Wa: torch.Tensor  # (D, c) lin_e0 o edge_proj ; bias includes lin_s0 / lin_t0 biases
    ba: torch.Tensor
    Ta: torch.Tensor | None
    Wsc: torch.Tensor  # (D, D) conv1 encoder (scale half) o lin1_0
    bsc: torch.Tensor
    Wsh: torch.Tensor  # shift half
    bsh: torch.Tensor
    Wb1: torch.Tensor  # (D, D) lin_e1 o lin1_0 ; bias includes lin_s1 / lin_t1 biases
    bb1: torch.Tensor
    Wh: torch.Tensor  # (D, D) edge_out.fc0 o lin1_1
    bh: torch.Tensor


def supports(model) -> bool:
    """Whether ``model`` has the architecture the folded plan is written for."""
    return (
        not model.is_mlp
        and len(model.gnn.convs) == 3
        and len(model.gnn.edge_update) == 2
        and len(model.edge_proj.fc) == 1
        and len(model.edge_out.fc) == 3
        and model.act_name == "silu"
    )


def fold(model, width: int) -> Folded:
    """Fold the model's linear maps for raw edge features of ``width`` = F * ctx columns."""
    f64 = {k: v.detach().double() for k, v in model.state_dict().items()}
    D = model.hid
    Wp, bp = f64["edge_proj.fc.0.weight"][:, :width], f64["edge_proj.fc.0.bias"]
    T = f64.get("layer_embed.weight")
    enc0_w, enc0_b = f64["gnn.convs.0.edge_encoder.weight"], f64["gnn.convs.0.edge_encoder.bias"]
    eu0 = {
        k: f64[f"gnn.edge_update.0.{k}"]
        for k in ("lin_e.weight", "lin_e.bias", "lin_s.bias", "lin_t.bias", "lin1.weight", "lin1.bias")
    }
    eu1 = {
        k: f64[f"gnn.edge_update.1.{k}"]
        for k in ("lin_e.weight", "lin_e.bias", "lin_s.bias", "lin_t.bias", "lin1.weight", "lin1.bias")
    }
    enc1_w, enc1_b = f64["gnn.convs.1.edge_encoder.weight"], f64["gnn.convs.1.edge_encoder.bias"]
    W1_0, b1_0 = eu0["lin1.weight"], eu0["lin1.bias"]
    W1_1, b1_1 = eu1["lin1.weight"], eu1["lin1.bias"]
    o0_w, o0_b = f64["edge_out.fc.0.weight"], f64["edge_out.fc.0.bias"]
    We0 = eu0["lin_e.weight"]
    out = Folded(
        W0=enc0_w @ Wp,
        b0=enc0_w @ bp + enc0_b,
        T0=None if T is None else T @ enc0_w.T,
        Wa=We0 @ Wp,
        ba=We0 @ bp + eu0["lin_e.bias"] + eu0["lin_s.bias"] + eu0["lin_t.bias"],
        Ta=None if T is None else T @ We0.T,
        Wsc=enc1_w[:D] @ W1_0,
        bsc=enc1_w[:D] @ b1_0 + enc1_b[:D],
        Wsh=enc1_w[D:] @ W1_0,
        bsh=enc1_w[D:] @ b1_0 + enc1_b[D:],
        Wb1=eu1["lin_e.weight"] @ W1_0,
        bb1=eu1["lin_e.weight"] @ b1_0 + eu1["lin_e.bias"] + eu1["lin_s.bias"] + eu1["lin_t.bias"],
        Wh=o0_w @ W1_1,
        bh=o0_w @ b1_1 + o0_b,
    )
    for name, value in vars(out).items():
        if value is not None:
            setattr(out, name, value.float().contiguous())
    return out


def split_raw(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, 2C) ``[hi, lo]`` in ``dtype`` with ``hi + lo`` = ``raw`` to ~2^-16 relative (bf16: 16 significant bits).

    The raw history of consecutive checkpoints differs by ~1e-3 relative: rounded once to bfloat16 (2^-9) the
    differences the model reads are lost (max error ~6% of the predicted change, measured on Llama 251K). Applied
    to ``[hi, lo]``, the layer-0 weights ``[W, W]`` (:func:`split_raw_weights`) see the float32 input to ~2^-16
    for the price of a (D, 2C) instead of a (D, C) GEMM per edge, ~1% of the step.
    """
    hi = raw.to(dtype)
    return torch.cat((hi, (raw - hi.float()).to(dtype)), 1)


def split_raw_weights(fw: Folded) -> Folded:
    """``fw`` for :func:`split_raw` features: the maps applied to the raw features, ``W0`` and ``Wa``, doubled."""
    return replace(fw, W0=torch.cat((fw.W0, fw.W0), 1), Wa=torch.cat((fw.Wa, fw.Wa), 1))


def _node_update(conv, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``silu(lin(post([x, agg])))`` of ``inputs = [x, agg]``. The list is emptied as soon as they are
    concatenated, so that a caller holding no other reference to ``x`` and ``agg`` frees them before the update's
    own (N, D) results are made; each intermediate is freed as soon as the next one exists."""
    h = torch.cat(inputs, 1)
    inputs.clear()
    h = conv.post_nns[0][0](h)
    h = conv.lin(h)
    return F.silu(h)


def _split_pre(conv, x):
    pre = conv.pre_nns[0][0]
    d = x.shape[1]
    return F.linear(x, pre.weight[:, :d], pre.bias), F.linear(x, pre.weight[:, d:])


# ---- the plan's stages ---------------------------------------------------------------------------------------
# Node terms are (N, D) and computed in full; the three edge passes take the raw features ``raw`` of one row range
# ``sh`` (its edges ``[sh.edge_lo, sh.edge_hi)``) and return that range's rows (passes 0, 1) or its edges' head
# outputs, so a caller may run them over the whole graph at once (``predict_deltas``) or tile by tile.


class Layer1(NamedTuple):
    """Node terms after layer 0: the node state and what edge update 0 / layer 1's message gather, (N, D) each."""

    x1: torch.Tensor
    s0: torch.Tensor  # lin_s of edge update 0 (gathered at the source)
    t0: torch.Tensor  # lin_t of edge update 0 (at the destination)
    nd: torch.Tensor  # layer 1's pre-projection, destination half (bias included)
    ns: torch.Tensor  # source half


class Head(NamedTuple):
    """Node terms the head pass gathers, (N, D) each, and the horizon-k rows of the last head layer."""

    s0: torch.Tensor
    t0: torch.Tensor
    s1: torch.Tensor
    t1: torch.Tensor
    wk: torch.Tensor  # (F, D)
    bk: torch.Tensor  # (F,)


def layer0_nodes(model, graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, nd, ns): input node states and layer 0's per-node pre-projections, (N, D) each."""
    x0 = model._node_input(graph)
    nd, ns = _split_pre(model.gnn.convs[0], x0)
    return x0, nd, ns


def _types(graph, e0: int, e1: int) -> torch.Tensor:
    return graph.edge_type_u8[e0:e1].long()  # int64 for this range only (8 bytes per edge)


def _edges(graph, raw, sh: RowRange, keep):
    """(raw, rowptr, src, types) of ``sh``'s edges, or of its edges at positions ``keep`` (sorted) only."""
    n0, n1, e0, e1 = sh.node_lo, sh.node_hi, sh.edge_lo, sh.edge_hi
    rowptr = graph.rowptr[n0 : n1 + 1] - e0
    src, types = graph.src[e0:e1], _types(graph, e0, e1)
    if keep is None:
        return raw, rowptr, src, types
    return raw[keep], torch.searchsorted(keep, rowptr), src[keep], types[keep]


def film_rows(graph, raw, sh: RowRange, nd, ns, fw: Folded, backend=None, keep=None) -> torch.Tensor:
    """Layer 0's aggregation for the rows of ``sh``: (node_hi - node_lo, D). ``keep``: aggregate only over these
    edges (sorted positions within ``sh``; the official ``edge_sample_ratio`` approximation)."""
    raw, rowptr, src, types = _edges(graph, raw, sh, keep)
    n0, n1 = sh.node_lo, sh.node_hi
    return dispatch.film_mean(raw, rowptr, src, nd[n0:n1], ns, fw.W0, fw.b0, types, fw.T0, backend=backend)


def after_layer0(model, inputs: list[torch.Tensor]) -> Layer1:
    """Layer 0's node update and the node terms of edge update 0 and layer 1; ``inputs = [x0, agg0]`` (emptied: see
    :func:`_node_update`)."""
    convs, eu = model.gnn.convs, model.gnn.edge_update[0]
    x1 = _node_update(convs[0], inputs)
    nd, ns = _split_pre(convs[1], x1)
    return Layer1(x1, F.linear(x1, eu.lin_s.weight), F.linear(x1, eu.lin_t.weight), nd, ns)


def edge_film_rows(graph, raw, sh: RowRange, l1: Layer1, fw: Folded, backend=None, keep=None) -> torch.Tensor:
    """Edge update 0 fused with layer 1's aggregation, for the rows of ``sh``: (node_hi - node_lo, D); ``keep`` as
    in :func:`film_rows`."""
    raw, rowptr, src, types = _edges(graph, raw, sh, keep)
    n0, n1 = sh.node_lo, sh.node_hi
    return dispatch.edge_film_mean(
        raw,
        rowptr,
        src,
        fw.Wa,
        fw.ba,
        types,
        fw.Ta,
        l1.s0,
        l1.t0[n0:n1],
        l1.nd[n0:n1],
        l1.ns,
        fw.Wsc,
        fw.bsc,
        fw.Wsh,
        fw.bsh,
        backend=backend,
    )


def after_layer1(model, graph, l1: Layer1, inputs: list[torch.Tensor], k: int) -> Head:
    """Layer 1's node update and the head's node terms; ``inputs = [x1, agg1]`` (emptied: see
    :func:`_node_update`), ``l1`` gives edge update 0's terms ``s0`` / ``t0``."""
    eu = model.gnn.edge_update[1]
    x2 = _node_update(model.gnn.convs[1], inputs)
    n_feat = graph.max_feat_size
    last = model.edge_out.fc[-1]
    wk = last.weight.view(model.max_feat_size, model.seq_len, -1)[:n_feat, k - 1].contiguous()
    bk = last.bias.view(model.max_feat_size, model.seq_len)[:n_feat, k - 1].contiguous()
    return Head(l1.s0, l1.t0, F.linear(x2, eu.lin_s.weight), F.linear(x2, eu.lin_t.weight), wk, bk)


def head_rows(graph, raw, sh: RowRange, used, hd: Head, fw: Folded, backend=None) -> torch.Tensor:
    """Edge update 1 and the horizon-k head on edges ``used`` (sorted positions within ``sh``'s edges):
    (len(used), F) scaled deltas. Runs in chunks of edges, bounding the (chunk, D) temporaries.

    When most edges are used (transformers: all but the ~1 structural edge per node), the head runs on contiguous
    edge ranges -- views, no gathers of raw features and indices -- and the used rows are picked at the end: each
    edge's output is computed on its own, so the result is the same, for < 1% more edges."""
    e0, e1 = sh.edge_lo, sh.edge_hi
    src, dst, types = graph.src[e0:e1], graph.dst[e0:e1], graph.edge_type_u8[e0:e1]
    out_dtype = torch.promote_types(raw.dtype, torch.float32)  # float32 deltas from 16-bit features
    dense = used.numel() >= DENSE_HEAD * (e1 - e0)
    n = e1 - e0 if dense else used.numel()
    out = torch.empty(n, graph.max_feat_size, dtype=out_dtype, device=raw.device)
    chunk = HEAD_CHUNK if raw.device.type == "cpu" else HEAD_CHUNK_GPU
    for i in range(0, n, chunk):
        if dense:
            part = slice(i, min(i + chunk, n))
            r_, s_, d_, et = raw[part], src[part], dst[part], types[part].long()
        else:
            ids = used[i : i + chunk]
            r_, s_, d_, et = raw[ids], src[ids], dst[ids], types[ids].long()
        update = (r_, s_, d_, fw.Wa, fw.ba, fw.Wb1, fw.bb1, et, fw.Ta, hd.s0, hd.t0, hd.s1, hd.t1)
        if raw.device.type == "cpu":  # one pass: each tile's edge state stays in cache between the layers
            out[i : i + chunk] = dispatch.edge_mlp(
                *update, weight_c=fw.Wh, bias_c=fw.bh, weight_d=hd.wk, bias_d=hd.bk, backend=backend
            )
            continue
        h1 = dispatch.edge_mlp(*update, act_out=True, backend=backend)
        if h1.dtype != raw.dtype:  # 16-bit edge features (GPU backends): the head reads h1 at that width too
            h1 = h1.to(raw.dtype)
        out[i : i + chunk] = dispatch.edge_mlp(h1, s_, d_, fw.Wh, fw.bh, hd.wk, hd.bk, backend=backend)
        del h1  # before the next chunk's: one (chunk, D) buffer alive, not two
    return out.index_select(0, used) if dense and used.numel() < n else out


def predict_deltas(
    model, graph, raw: torch.Tensor, k: int, used: torch.Tensor, fw: Folded, backend=None
) -> torch.Tensor:
    """Scaled parameter deltas (len(used), F) at horizon k, in one pass over the whole graph (the in-memory plan).

    ``raw``: raw edge features of all edges; ``used``: the edges (sorted) whose prediction is needed. ``fw`` is
    ``fold(model, raw.shape[1])`` (the model caches it). Traceable by torch.compile (fullgraph).
    :mod:`nino_fast.stream` runs the same stages over row tiles instead, with memory bounded by ``max_memory``.
    """
    rows = RowRange.whole(graph)
    x0, nd, ns = layer0_nodes(model, graph)
    agg0 = film_rows(graph, raw, rows, nd, ns, fw, backend)
    l1 = after_layer0(model, [x0, agg0])
    agg1 = edge_film_rows(graph, raw, rows, l1, fw, backend)
    hd = after_layer1(model, graph, l1, [l1.x1, agg1], k)
    return head_rows(graph, raw, rows, used, hd, fw, backend)
