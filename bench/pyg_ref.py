"""The maths of ``nino_fast.nn``'s layers written as a PyG user writes them (``MessagePassing``, per-edge messages
materialised), with the same parameter names, so ``pyg_like(layer)`` carries the very same weights.

- :class:`EdgeFiLMConvPyG`: ``MessagePassing(aggr='mean')``; message ``scale * lin([x_i, x_j]) + shift`` with
  ``[scale, shift] = lin_edge(e)``: a (2D x C) and a (D x 2D) GEMM per edge.
- :class:`EdgeUpdatePyG`: ``lin_out(silu(lin_edge(e) + lin_src(x)[src] + lin_dst(x)[dst]))``: two GEMMs per edge
  (the node terms per node, then gathered).
- :class:`EdgeUpdateFiLMConvPyG`: the two in sequence (the updated edge features are materialised).

Only the benchmarks' ``pyg`` setups import this module (torch_geometric is an optional dependency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing


class EdgeFiLMConvPyG(MessagePassing):
    def __init__(self, in_channels: int, out_channels: int, edge_dim: int):
        super().__init__(aggr="mean", node_dim=0)
        self.lin = nn.Linear(2 * in_channels, out_channels)
        self.lin_edge = nn.Linear(edge_dim, 2 * out_channels)

    def forward(self, x, edge_index, edge_attr):
        return self.propagate(edge_index, x=x, edge_attr=edge_attr)

    def message(self, x_i, x_j, edge_attr):
        scale, shift = self.lin_edge(edge_attr).chunk(2, dim=-1)
        return scale * self.lin(torch.cat((x_i, x_j), -1)) + shift


class EdgeUpdatePyG(nn.Module):
    def __init__(self, in_channels: int, edge_dim: int, out_channels: int, hidden_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or out_channels
        self.lin_edge = nn.Linear(edge_dim, hidden)
        self.lin_src = nn.Linear(in_channels, hidden)
        self.lin_dst = nn.Linear(in_channels, hidden)
        self.lin_out = nn.Linear(hidden, out_channels)

    def forward(self, x, edge_index, edge_attr):
        h = self.lin_edge(edge_attr) + self.lin_src(x)[edge_index[0]] + self.lin_dst(x)[edge_index[1]]
        return self.lin_out(F.silu(h))


class EdgeUpdateFiLMConvPyG(nn.Module):
    def __init__(self, update: EdgeUpdatePyG, conv: EdgeFiLMConvPyG):
        super().__init__()
        self.update, self.conv = update, conv

    def forward(self, x, edge_index, edge_attr, x_conv=None):
        return self.conv(x if x_conv is None else x_conv, edge_index, self.update(x, edge_index, edge_attr))


def pyg_like(layer: nn.Module) -> nn.Module:
    """The PyG module of the same maths as the ``nino_fast.nn`` layer, with a copy of its weights."""
    from nino_fast.nn import EdgeFiLMConv, EdgeUpdate, EdgeUpdateFiLMConv

    if isinstance(layer, EdgeFiLMConv):
        out = EdgeFiLMConvPyG(layer.in_channels, layer.out_channels, layer.edge_dim)
    elif isinstance(layer, EdgeUpdate):
        out = EdgeUpdatePyG(layer.in_channels, layer.edge_dim, layer.out_channels, layer.lin_edge.out_features)
    elif isinstance(layer, EdgeUpdateFiLMConv):
        out = EdgeUpdateFiLMConvPyG(pyg_like(layer.update), pyg_like(layer.conv))
    else:
        raise TypeError(f"pyg_like: no PyG version of {type(layer).__name__}")
    p = next(layer.parameters())
    out = out.to(p.device, p.dtype)
    out.load_state_dict(layer.state_dict())
    return out
