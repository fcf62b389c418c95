"""``edge_film_mean``: the edge update fused with the next FiLM message pass (one EdgeUpdateFiLMConv forward).

Ours / reference / compiled: the op with the per-node terms and the folded weights computed in the timed call;
pyg: :class:`bench.pyg_ref.EdgeUpdateFiLMConvPyG` (the two layers in sequence, updated edges materialised).
FLOPs: two D x D GEMMs per edge (update, scale half), five per node (shift half, four node terms).
"""

from __future__ import annotations

import torch

from . import Case, Setup, graph, op_call, randn, seeded

OPS = ("edge_film_mean",)


def setup(case: Case, backend: str) -> Setup:
    from nino_fast.nn import EdgeFiLMConv, EdgeUpdate, EdgeUpdateFiLMConv

    d, g = case.dim, graph(case)
    c = case.edge_dim
    x, e = randn(case, g.nodes, d, salt=1), randn(case, case.edges, c, salt=2, scale=0.5)
    fused = seeded(case, lambda: EdgeUpdateFiLMConv(EdgeUpdate(d, c, d), EdgeFiLMConv(d, d, d)))
    if backend == "pyg":
        from ..pyg_ref import pyg_like

        module = pyg_like(fused)
        call = lambda: module(x, g.edge_index, e)
    else:
        op, up, conv = op_call("edge_film_mean", backend), fused.update, fused.conv

        def call():  # what EdgeUpdateFiLMConv.forward passes to the op
            bias, node_src, node_dst = up.pre_terms(x)
            msg_dst, msg_src = conv.node_terms(x)
            w_enc = conv.lin_edge.weight
            w_fold, b_fold = w_enc @ up.lin_out.weight, torch.addmv(conv.lin_edge.bias, w_enc, up.lin_out.bias)
            return op(
                e, g.rowptr, g.src, up.lin_edge.weight, bias, None, None, node_src, node_dst, msg_dst, msg_src,
                w_fold[:d], b_fold[:d], w_fold[d:], b_fold[d:],
            )  # fmt: skip

    return Setup(torch.no_grad()(call), 2 * d * (c + d) * case.edges + 10 * d * d * g.nodes, e.nbytes + g.src.nbytes)
