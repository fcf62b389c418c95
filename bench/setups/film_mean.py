"""``film_mean``: FiLM message + mean aggregation (one EdgeFiLMConv forward), C = ``case.edge_dim``.

Ours / reference / compiled: the op with the per-node terms computed in the timed call; pyg: the
``MessagePassing`` version (:class:`bench.pyg_ref.EdgeFiLMConvPyG`). FLOPs (minimal formulation): the scale
half per edge (E x D x C), the shift half per node on summed features (N x D x C), two per-node terms (N x D x D).
"""

from __future__ import annotations

import torch

from . import Case, Setup, graph, op_call, randn, seeded

OPS = ("film_mean",)


def setup(case: Case, backend: str) -> Setup:
    from nino_fast.nn import EdgeFiLMConv

    d, g = case.dim, graph(case)
    c = case.edge_dim
    x, e = randn(case, g.nodes, d, salt=1), randn(case, case.edges, c, salt=2, scale=0.5)
    conv = seeded(case, lambda: EdgeFiLMConv(d, d, c))
    if backend == "pyg":
        from ..pyg_ref import pyg_like

        module = pyg_like(conv)
        call = lambda: module(x, g.edge_index, e)
    else:
        op, w, b = op_call("film_mean", backend), conv.lin_edge.weight, conv.lin_edge.bias

        def call():
            node_dst, node_src = conv.node_terms(x)
            return op(e, g.rowptr, g.src, node_dst, node_src, w, b)

    flops = 2 * d * c * (case.edges + g.nodes) + 4 * d * d * g.nodes
    return Setup(torch.no_grad()(call), flops, e.nbytes + g.src.nbytes)
