"""``edge_mlp``: the edge update ``lin_out(silu(lin_edge(e) + lin_src(x_j) + lin_dst(x_i)))`` (one EdgeUpdate
forward), C = ``case.edge_dim``, D' = D, edges in CSR order.

Ours / reference / compiled: the op with the per-node terms computed in the timed call; pyg:
:class:`bench.pyg_ref.EdgeUpdatePyG`. FLOPs: a D x C and a D x D GEMM per edge, two D x D per node.
"""

from __future__ import annotations

import torch

from . import Case, Setup, graph, op_call, randn, seeded

OPS = ("edge_mlp",)


def setup(case: Case, backend: str) -> Setup:
    from nino_fast.nn import EdgeUpdate

    d, g = case.dim, graph(case)
    c = case.edge_dim
    x, e = randn(case, g.nodes, d, salt=1), randn(case, case.edges, c, salt=2, scale=0.5)
    up = seeded(case, lambda: EdgeUpdate(d, c, d))
    if backend == "pyg":
        from ..pyg_ref import pyg_like

        module = pyg_like(up)
        call = lambda: module(x, g.edge_index, e)
    else:
        op = op_call("edge_mlp", backend)
        w_a, w_b, b_b = up.lin_edge.weight, up.lin_out.weight, up.lin_out.bias

        def call():
            bias, node_src, node_dst = up.pre_terms(x)
            return op(e, g.src, g.dst, w_a, bias, w_b, b_b, None, None, node_src, node_dst)

    out_bytes = e.nbytes + case.edges * d * e.element_size() + 2 * g.src.nbytes
    return Setup(torch.no_grad()(call), 2 * d * (c + d) * case.edges + 4 * d * d * g.nodes, out_bytes)
