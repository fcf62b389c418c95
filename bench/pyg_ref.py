"""The same maths as our fused ops, written the way a PyG user (and the official NiNo code) writes it.

- ``FiLMConvPyG``: ``MessagePassing(aggr='mean')`` whose message is ``scale * pre([x_i, x_j]) + shift`` with
  ``[scale, shift] = edge_encoder(e)``: a (2D x C) and a (D x 2D) GEMM per edge.
- ``EdgeMLPPyG``: ``lin1(silu(lin_e(e) + lin_s(x)[src] + lin_t(x)[dst]))``: two (D x D) GEMMs per edge.
Used only by the benchmarks (torch_geometric is an optional dependency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing


class FiLMConvPyG(MessagePassing):
    def __init__(self, d: int, c: int):
        super().__init__(aggr="mean", node_dim=0)
        self.edge_encoder = nn.Linear(c, 2 * d)
        self.pre = nn.Linear(2 * d, d)

    def forward(self, x, edge_index, edge_attr):
        return self.propagate(edge_index, x=x, edge_attr=edge_attr)

    def message(self, x_i, x_j, edge_attr):
        scale, shift = self.edge_encoder(edge_attr).chunk(2, dim=-1)
        return scale * self.pre(torch.cat((x_i, x_j), -1)) + shift


class EdgeMLPPyG(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin_e, self.lin_s, self.lin_t, self.lin1 = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, edge_index, edge_attr):
        h = self.lin_e(edge_attr) + self.lin_s(x)[edge_index[0]] + self.lin_t(x)[edge_index[1]]
        return self.lin1(F.silu(h))
