"""GNN layers on the fused ops of nino_fast, usable on any graph (PyG conventions: ``forward(x, edge_index,
edge_attr)``): :class:`EdgeFiLMConv`, :class:`EdgeUpdate`, their fused composition :class:`EdgeUpdateFiLMConv`,
and :class:`CSRGraph` to pass a pre-sorted graph."""

from .conv import EdgeFiLMConv, EdgeUpdate, EdgeUpdateFiLMConv
from .graph import CSRGraph

__all__ = ["CSRGraph", "EdgeFiLMConv", "EdgeUpdate", "EdgeUpdateFiLMConv"]
