r"""``MetaNet``: a graph-level metanetwork (NG-GNN / Graph Metanetworks style) on the fused layers of
:mod:`nino_fast.nn`, predicting a property of a trained network (e.g. its test accuracy) from its weights.

.. math::
    x^0 = \mathrm{enc}_x(\text{node features}), \qquad
    e^0 = \mathrm{enc}_e(\text{edge features}) + \mathrm{emb}(\text{edge type})

    x^{l+1} = \mathrm{LN}\big(x^l + \mathrm{silu}(\mathrm{EdgeFiLMConv}(x^l, e^l))\big), \qquad
    e^{l+1} = e^l + \mathrm{EdgeUpdate}(x^{l+1}, e^l)

    \hat y = \mathrm{head}([\mathrm{pool}_{v \in V_g}(x^L_v)]_g, [\mathrm{pool}_{e \in E_g}(e^L)]_g)

with the readout groups :math:`V_g` (inputs, bias and norm nodes, hidden neurons, outputs) and :math:`E_g`
(weight / bias / norm / structural edges into the first layer, in between, into the outputs).

Every piece is equivariant to node permutations and the pooling is invariant, so permuting the hidden neurons of
the input model leaves the prediction unchanged (up to float summation order). Edge channels (``edge_dim``) are
kept narrower than node channels (``hid``): the fused FiLM kernel never forms the per-edge (2 hid) messages, so
the per-edge work it does is the (edge_dim x 2 hid) modulation only.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import EdgeFiLMConv, EdgeUpdate
from . import features as feats
from .features import GraphBatch, GraphCache, collate, graph_input

FORMAT = "nino_fast.metanet/1"
POOLS = ("mean", "sum", "attention")


def _mlp(d_in: int, d_hid: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hid), nn.SiLU(), nn.Linear(d_hid, d_out))


def edge_inputs(a: torch.Tensor) -> torch.Tensor:
    """(E, 3 C) encoder inputs from raw edge values (E, C): ``10 a``, ``10 |a|`` and ``log(|a| + 1e-3)``. Trained
    weights are mostly |w| < 0.5, where a freshly initialised encoder is nearly linear (and the mean of a linear
    function of symmetric weights says little); the magnitude and its log make spread and scale first-class."""
    return torch.cat((10 * a, 10 * a.abs(), torch.log(a.abs() + 1e-3)), 1)


def segment_pool(h: torch.Tensor, index: torch.Tensor, num: int, how: str, score: torch.Tensor | None = None):
    """Pool rows of ``h`` (M, D) into ``num`` groups given by ``index`` (M,): mean, sum, or attention (softmax of
    ``score`` (M,) within each group, then the weighted sum). Tensor ops only (no loop over groups)."""
    if how == "attention":
        top = h.new_full((num,), float("-inf")).scatter_reduce(0, index, score, "amax")
        w = torch.exp(score - top[index])
        denom = h.new_zeros(num).index_add_(0, index, w)
        h = h * (w / denom[index]).unsqueeze(1)
        how = "sum"
    total = h.new_zeros(num, h.shape[1]).index_add_(0, index, h)
    if how == "sum":
        return total
    count = h.new_zeros(num).index_add_(0, index, torch.ones_like(index, dtype=h.dtype))
    return total / count.clamp(min=1).unsqueeze(1)


class MetaNet(nn.Module):
    """A metanetwork over neural graphs (any architecture :func:`~nino_fast.graph.build_graph` supports).

    Args:
        hid: node channels.
        edge_dim: edge channels.
        layers: message-passing layers (``EdgeFiLMConv`` then ``EdgeUpdate`` each).
        pool: readout over nodes and over edges: ``'mean'``, ``'sum'`` or ``'attention'``.
        max_feat_size: parameter values per edge the model takes (9: 3x3 kernels; larger kernels are refused).

    ``forward(batch)`` takes a :class:`~.features.GraphBatch` and returns (B,) predictions in target units;
    :meth:`predict` takes a module or a state dict. ``target_mean`` / ``target_std`` (buffers) map the head's
    standardised output to target units (set by training).
    """

    def __init__(self, hid: int = 128, edge_dim: int = 16, layers: int = 3, pool: str = "mean", max_feat_size: int = 9):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"MetaNet: pool must be one of {list(POOLS)}, got {pool!r}")
        for name, v in (("hid", hid), ("edge_dim", edge_dim), ("layers", layers), ("max_feat_size", max_feat_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MetaNet: {name} must be a positive int, got {v!r}")
        self.config = {"hid": hid, "edge_dim": edge_dim, "layers": layers, "pool": pool, "max_feat_size": max_feat_size}
        self.max_feat_size, self.pool = max_feat_size, pool
        self.node_enc = _mlp(feats.NODE_DIM, hid, hid)
        self.edge_enc = _mlp(3 * (max_feat_size + feats.BN_STATS), edge_dim, edge_dim)
        self.type_emb = nn.Embedding(feats.NUM_EDGE_TYPES, edge_dim)
        self.convs = nn.ModuleList(EdgeFiLMConv(hid, hid, edge_dim) for _ in range(layers))
        self.updates = nn.ModuleList(EdgeUpdate(hid, edge_dim, edge_dim) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hid) for _ in range(layers))
        self.node_score = nn.Linear(hid, 1)
        self.edge_score = nn.Linear(edge_dim, 1)
        self.head = _mlp(feats.NODE_GROUPS * hid + feats.EDGE_GROUPS * edge_dim, hid, 1)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        # the graph argument the layers take: the CSRGraph for nino_fast.nn's, edge_index for PyG-style layers
        self.graph_input = "csr"

    def embed(self, batch: GraphBatch) -> torch.Tensor:
        """(B, NODE_GROUPS * hid + EDGE_GROUPS * edge_dim) graph embeddings: node and edge states after the last
        layer, pooled per readout group (inputs / bias and norm nodes / hidden / outputs; edges by kind and
        place)."""
        graph = batch.csr if self.graph_input == "csr" else batch.edge_index
        x = self.node_enc(batch.x)
        e = self.edge_enc(edge_inputs(batch.edge_attr)) + self.type_emb(batch.edge_type)
        for conv, update, norm in zip(self.convs, self.updates, self.norms, strict=True):
            x = norm(x + F.silu(conv(x, graph, e)))
            e = e + update(x, graph, e)
        scores = (
            (self.node_score(x).squeeze(1), self.edge_score(e).squeeze(1)) if self.pool == "attention" else (None,) * 2
        )
        b = batch.num_graphs
        node = segment_pool(
            x, batch.node_batch * feats.NODE_GROUPS + batch.node_group, b * feats.NODE_GROUPS, self.pool, scores[0]
        )
        edge = segment_pool(
            e, batch.edge_batch * feats.EDGE_GROUPS + batch.edge_group, b * feats.EDGE_GROUPS, self.pool, scores[1]
        )
        return torch.cat((node.view(b, -1), edge.view(b, -1)), 1)

    def forward_standardized(self, batch: GraphBatch) -> torch.Tensor:
        """(B,) head outputs in standardised target units (what training regresses)."""
        return self.head(self.embed(batch)).squeeze(1)

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        """(B,) predictions in target units."""
        return self.forward_standardized(batch) * self.target_std + self.target_mean

    @torch.no_grad()
    def predict(self, model: nn.Module | dict, spec: dict | None = None) -> float:
        """The predicted property of one model: an ``nn.Module``, or a state dict (with the zoo ``spec`` it was
        trained with, checked against it; without one, its non-buffer tensors are read as the parameters of a
        generic fc/conv model)."""
        if spec is not None:
            from .zoo import model_from

            model = model_from(spec, model if isinstance(model, dict) else model.state_dict())
        return float(self.predict_many([model])[0])

    @torch.no_grad()
    def predict_many(self, models: list, batch_size: int = 64, cache: GraphCache | None = None) -> torch.Tensor:
        """(len(models),) predictions (CPU) for modules or state dicts, ``batch_size`` graphs per forward pass on the
        metanetwork's device."""
        was_training = self.training
        self.eval()
        cache = cache or GraphCache()
        try:
            inputs = [graph_input(m, self.max_feat_size, cache) for m in models]
            device = self.target_mean.device
            batches = (collate(inputs[i : i + batch_size]).to(device) for i in range(0, len(inputs), batch_size))
            outs = [self(b).cpu() for b in batches]
        finally:
            self.train(was_training)
        return torch.cat(outs) if outs else torch.zeros(0)

    # ---- save / load -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, **extra) -> None:
        """Write config and weights (and ``extra`` JSON-able metadata, e.g. training history) to ``path``."""
        torch.save({"format": FORMAT, "config": self.config, "state_dict": self.state_dict(), "extra": extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> MetaNet:
        """A model written by :meth:`save`; ValueError when the file is not a metanet checkpoint."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"MetaNet.load: {path} is not a metanet checkpoint (format {got!r}, expected {FORMAT!r})")
        model = cls(**ckpt["config"])
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
        if missing or unexpected:
            raise ValueError(f"MetaNet.load: {path}: missing weights {missing}, unexpected {unexpected}")
        model.extra = ckpt.get("extra", {})
        return model.eval()
