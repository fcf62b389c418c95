"""Differentiable NiNo forward for meta-training: the scaled deltas of every parameter at every horizon 1..K.

Three paths, the same maths (the official model in training mode, checked against each other in the tests):

- ``folded``: the inference plan of :mod:`nino_fast.plan` (film_mean -> edge_film_mean -> edge_mlp x 2, with the
  linear maps folded, no edge state materialised), its folded weights formed *with autograd* in float32 from the
  model's parameters, and the ops of :mod:`nino_fast.ops.dispatch` (fused kernels forward, analytic backward:
  fused CPU kernels too, or PyTorch formulas on other devices).
- ``layerwise``: the official layer order (edge_proj, conv 0, edge update 0, conv 1, edge update 1, head) on
  the same autograd ops, unfolded.
- ``oracle``: ``layerwise`` on the pure-PyTorch reference ops with plain autograd (the baseline the fused path
  is measured against: what training the official model costs without our kernels).

The WNN+ MLP (``NiNoModel(gnn=False)``) has no graph: :func:`predict_wnn` runs its per-parameter MLP on a
:class:`~nino_fast.meta.data.ParamBatch` (plain PyTorch ops and autograd; the same loss, :func:`wnn_loss`).

Only parameter-carrying edges reach the head, and edges whose parameters all sit in feature slot 0 (linear
layers, biases) only compute the head's K slot-0 rows instead of F * K. Layer 2's message pass feeds nothing the
loss reads and is skipped (so its weights get no gradient, as in the official training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import dispatch, reference
from .data import Batch, ParamBatch

PATHS = ("folded", "layerwise", "oracle")


def check_trainable(model) -> None:
    """Raise ValueError unless ``model`` is an architecture the trainer supports: the official GNN (the fused
    paths) or the WNN+ MLP (:func:`predict_wnn`)."""
    if model.is_mlp:
        if len(model.edge_proj.fc) != 1 or len(model.edge_mlp.fc) != 7:
            raise ValueError("meta-training supports the official WNN+ layers: linear edge_proj, 4-layer edge_mlp")
        return
    if len(model.gnn.convs) != 3 or len(model.gnn.edge_update) != 2:
        raise ValueError("meta-training supports the official GNN architecture (3 layers, 2 edge updates)")
    if len(model.edge_proj.fc) != 1 or len(model.edge_out.fc) != 3 or model.act_name != "silu":
        raise ValueError("meta-training supports the official layers: linear edge_proj, 2-layer head, SiLU")
    if not model.residual or model.upd_scale != 1.0:
        raise ValueError("meta-training supports residual=True, upd_scale=1 (the official training setting)")


def _node_input(model, b: Batch) -> torch.Tensor:
    """:meth:`NiNoModel._node_input` on the batch: Laplacian encoding, plus the word-embedding row positions'
    embedding (``wte_pos_enc``)."""
    x = torch.zeros(b.num_nodes, model.hid)
    if model.lpe:
        x = x + model.node_proj(b.lpe)
    if model.wte_pos_enc:
        x = x + model.wte_pos_enc_layer(b.pos_w)
    return x


def _node_update(conv, x, agg):
    return F.silu(conv.lin(conv.post_nns[0][0](torch.cat((x, agg), 1))))


def _split_pre(conv, x):
    pre = conv.pre_nns[0][0]
    d = x.shape[1]
    return F.linear(x, pre.weight[:, :d], pre.bias), F.linear(x, pre.weight[:, d:])


def _head_rows(model, n_feat: int):
    """Last head layer restricted to slot 0 (K rows) and to the first ``n_feat`` slots (n_feat * K rows)."""
    last = model.edge_out.fc[-1]
    w = last.weight.view(model.max_feat_size, model.seq_len, -1)
    b = last.bias.view(model.max_feat_size, model.seq_len)
    return (w[0], b[0]), (w[:n_feat].reshape(n_feat * model.seq_len, -1), b[:n_feat].reshape(-1))


def _pieces(model, b: Batch, head) -> list[torch.Tensor]:
    """``head(edges, w, b)`` on the single-slot edges (U1, K) and on the multi-slot edges (U9, F * K)."""
    (w1, b1), (wf, bf) = _head_rows(model, b.max_feat_size)
    return [head(b.single, w1, b1), head(b.multi, wf, bf)]


def _folded(model, b: Batch, backend):
    """:func:`nino_fast.plan.predict_deltas` for all horizons, its folded weights built with autograd (D x D
    products of the parameters, once per step) so that gradients flow back to the model's own weights."""
    D, width = model.hid, b.raw.shape[1]
    Wp, bp = model.edge_proj.fc[0].weight[:, :width], model.edge_proj.fc[0].bias
    T = model.layer_embed.weight if model.edge_types else None
    convs, eus = model.gnn.convs, model.gnn.edge_update
    enc0, enc1 = convs[0].edge_encoder, convs[1].edge_encoder
    e0, e1 = eus[0], eus[1]
    W1_0, b1_0 = e0.lin1.weight, e0.lin1.bias
    W0, b0 = enc0.weight @ Wp, enc0.weight @ bp + enc0.bias
    Wa, ba = e0.lin_e.weight @ Wp, e0.lin_e.weight @ bp + e0.lin_e.bias + e0.lin_s.bias + e0.lin_t.bias
    T0, Ta = (None, None) if T is None else (T @ enc0.weight.t(), T @ e0.lin_e.weight.t())
    Wsc, bsc = enc1.weight[:D] @ W1_0, enc1.weight[:D] @ b1_0 + enc1.bias[:D]
    Wsh, bsh = enc1.weight[D:] @ W1_0, enc1.weight[D:] @ b1_0 + enc1.bias[D:]
    Wb1 = e1.lin_e.weight @ W1_0
    bb1 = e1.lin_e.weight @ b1_0 + e1.lin_e.bias + e1.lin_s.bias + e1.lin_t.bias
    o0 = model.edge_out.fc[0]
    Wh, bh = o0.weight @ e1.lin1.weight, o0.weight @ e1.lin1.bias + o0.bias

    raw, rowptr, src, dst, et = b.raw, b.rowptr, b.src, b.dst, b.edge_type
    x0 = _node_input(model, b)
    nd, ns = _split_pre(convs[0], x0)
    x1 = _node_update(convs[0], x0, dispatch.film_mean(raw, rowptr, src, nd, ns, W0, b0, et, T0, backend=backend))
    s0, t0 = F.linear(x1, e0.lin_s.weight), F.linear(x1, e0.lin_t.weight)
    nd, ns = _split_pre(convs[1], x1)
    rest = (s0, t0, nd, ns, Wsc, bsc, Wsh, bsh)
    agg1 = dispatch.edge_film_mean(raw, rowptr, src, Wa, ba, et, Ta, *rest, backend=backend)
    x2 = _node_update(convs[1], x1, agg1)
    s1, t1 = F.linear(x2, e1.lin_s.weight), F.linear(x2, e1.lin_t.weight)

    def head(ids, w, bias):
        s_, d_ = src[ids], dst[ids]
        terms = (s0, t0, s1, t1)
        h1 = dispatch.edge_mlp(raw[ids], s_, d_, Wa, ba, Wb1, bb1, et[ids], Ta, *terms, act_out=True, backend=backend)
        return dispatch.edge_mlp(h1, s_, d_, Wh, bh, w, bias, backend=backend)

    return _pieces(model, b, head)


def _layerwise(model, b: Batch, ops, backend):
    kw = {} if ops is reference else {"backend": backend}
    raw, rowptr, src, dst = b.raw, b.rowptr, b.src, b.dst
    lin = model.edge_proj.fc[0]
    e = F.linear(raw, lin.weight[:, : raw.shape[1]], lin.bias)
    if model.edge_types:
        e = e + model.layer_embed(b.edge_type)
    x = _node_input(model, b)
    for conv, eu in zip(model.gnn.convs[:2], model.gnn.edge_update, strict=True):
        nd, ns = _split_pre(conv, x)
        enc = conv.edge_encoder
        x = _node_update(conv, x, ops.film_mean(e, rowptr, src, nd, ns, enc.weight, enc.bias, **kw))
        bias = eu.lin_e.bias + eu.lin_s.bias + eu.lin_t.bias
        ns_, nd_ = F.linear(x, eu.lin_s.weight), F.linear(x, eu.lin_t.weight)
        e = ops.edge_mlp(e, src, dst, eu.lin_e.weight, bias, eu.lin1.weight, eu.lin1.bias, None, None, ns_, nd_, **kw)
    fc0 = model.edge_out.fc[0]

    def head(ids, w, bias):
        return ops.edge_mlp(e[ids], src[ids], dst[ids], fc0.weight, fc0.bias, w, bias, **kw)

    return _pieces(model, b, head)


def predict_pieces(model, b: Batch, path: str = "folded", backend: str | None = None) -> list[torch.Tensor]:
    """Predicted scaled deltas at horizons 1..K, differentiable: ``[(U1, K), (U9, F * K)]``, rows in the batch's
    row order once flattened to ``(-1, K)`` (see :class:`~nino_fast.meta.data.Batch`)."""
    if path == "folded":
        return _folded(model, b, backend)
    if path == "layerwise":
        return _layerwise(model, b, dispatch, backend)
    if path == "oracle":
        return _layerwise(model, b, reference, None)
    raise ValueError(f"meta.forward.predict: path must be one of {PATHS}, got {path!r}")


def predict(model, b: Batch, path: str = "folded", backend: str | None = None) -> torch.Tensor:
    """(P, K) predicted scaled deltas of every parameter of the batch, in the samples' parameter order."""
    K = model.seq_len
    rows = torch.cat([p.reshape(-1, K) for p in predict_pieces(model, b, path, backend)])
    return rows.index_select(0, b.row_of_param)


def predict_wnn(model, b: ParamBatch) -> torch.Tensor:
    """WNN+: (P, K) predicted scaled deltas of every parameter of ``b`` at horizons 1..K, differentiable
    (:meth:`nino_fast.NiNoModel._wnn` for all horizons at once)."""
    if not model.is_mlp:
        raise ValueError("meta.forward.predict_wnn: the model is a GNN (gnn=True); use predict_pieces")
    h = model.edge_proj(b.x)
    if model.edge_types:
        h = h + model.layer_embed(b.edge_type)
    return model.edge_mlp(h)


class _MaskedL1Sum(torch.autograd.Function):
    """``sum(|pred - target| * mask)`` in three passes (sub, sign*mask, dot); backward: one multiply."""

    @staticmethod
    def forward(ctx, pred, target, mask):
        diff = pred - target
        direction = torch.sign(diff).mul_(mask)
        ctx.save_for_backward(direction)
        return torch.dot(diff.reshape(-1), direction.reshape(-1))

    @staticmethod
    def backward(ctx, g):
        (direction,) = ctx.saved_tensors
        return direction * g, None, None


def loss_fn(pieces: list[torch.Tensor], b: Batch) -> torch.Tensor:
    """The paper's loss: mean L1 error of the scaled deltas over parameters and available horizons 1..K
    (the official ``l1_loss(out[y_mask], y[y_mask])``; the residual makes it a loss on deltas).
    ``pieces``: :func:`predict_pieces`' output."""
    total, row = 0, 0
    for p in pieces:
        n = p.numel()
        if n:
            view = slice(row, row + n // b.target.shape[1])
            total = total + _MaskedL1Sum.apply(p, b.target[view].view_as(p), b.mask[view].view_as(p))
        row += n // b.target.shape[1]
    return total / b.mask.sum().clamp_min(1)


def wnn_loss(pred: torch.Tensor, b: ParamBatch) -> torch.Tensor:
    """The same loss for WNN+: mean L1 error of the scaled deltas over parameters and available horizons;
    ``pred``: :func:`predict_wnn`'s (P, K) output."""
    return _MaskedL1Sum.apply(pred, b.target, b.mask) / b.mask.sum().clamp_min(1)
