"""GNN layers on the fused ops, for any graph: :class:`EdgeFiLMConv`, :class:`EdgeUpdate` and their fused
composition :class:`EdgeUpdateFiLMConv`. Forward and backward run the fused kernels of ``torch.ops.nino_fast``
(CPU, CUDA or Triton, per :mod:`nino_fast.ops.dispatch`); the per-edge messages are never stored.

Conventions as PyG's ``MessagePassing`` layers: ``x`` (N, F) node features, ``edge_index`` (2, E) [src; dst] (int64
or int32, any order, self loops and duplicate edges allowed) or a :class:`~nino_fast.nn.graph.CSRGraph`,
``edge_attr`` (E, edge_dim) in the order of ``edge_index``; node i receives from its in-edges j -> i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dispatch
from .graph import CSRGraph, check_edge_index_shape, csr_of

__all__ = ["EdgeFiLMConv", "EdgeUpdate", "EdgeUpdateFiLMConv"]


def _check(op: str, module: nn.Module, x, in_channels: int, edge_attr, edge_dim: int, edge_index, x_name="x") -> None:
    """Shapes, dtypes and devices of a layer's inputs; errors name the layer, the argument, expected and got."""
    num_edges = _num_edges(op, edge_index)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != in_channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {x_name} must have shape (N, {in_channels}), got {got}")
    if not isinstance(edge_attr, torch.Tensor) or edge_attr.dim() != 2 or edge_attr.shape[1] != edge_dim:
        got = tuple(edge_attr.shape) if isinstance(edge_attr, torch.Tensor) else type(edge_attr).__name__
        raise ValueError(f"{op}: edge_attr must have shape (E, {edge_dim}), got {got}")
    if edge_attr.shape[0] != num_edges:
        raise ValueError(f"{op}: edge_attr must have one row per edge ({num_edges}), got {edge_attr.shape[0]} rows")
    if not x.is_floating_point() or x.dtype != edge_attr.dtype:
        raise TypeError(
            f"{op}: {x_name} and edge_attr must share one floating dtype, got {x.dtype} and {edge_attr.dtype}"
        )
    weight = next(module.parameters())
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{op}: the inputs are {x.dtype} but the layer's parameters are {weight.dtype}; convert one to the "
            f"other (e.g. layer.to({x.dtype}))"
        )
    if x.device != edge_attr.device:
        raise ValueError(f"{op}: {x_name} and edge_attr must be on one device, got {x.device} and {edge_attr.device}")


def _num_edges(op: str, edge_index) -> int:
    if isinstance(edge_index, CSRGraph):
        return edge_index.num_edges
    check_edge_index_shape(edge_index, op)
    return edge_index.shape[1]


def _graph(op: str, x: torch.Tensor, edge_index) -> CSRGraph:
    if isinstance(edge_index, torch.Tensor) and edge_index.device != x.device:
        raise ValueError(f"{op}: edge_index must be on x's device {x.device}, got {edge_index.device}")
    return csr_of(edge_index, x.shape[0], op)


def _check_sizes(op: str, **sizes) -> None:
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {v!r}")


def _reset(*linears: nn.Linear) -> None:
    for lin in linears:
        lin.reset_parameters()


class EdgeFiLMConv(nn.Module):
    r"""Edge-conditioned FiLM convolution with mean aggregation (NiNo's layer, any graph).

    .. math::
        [\gamma_{ij}, \beta_{ij}] = \mathrm{lin\_edge}(e_{ij}), \qquad
        x'_i = \frac{1}{|\mathcal{N}(i)|} \sum_{j \in \mathcal{N}(i)}
               \gamma_{ij} \odot \mathrm{lin}([x_i, x_j]) + \beta_{ij}

    (``x'_i = 0`` for a node without in-edges). Submodules: ``lin = Linear(2 * in_channels, out_channels)`` on
    ``[x_dst, x_src]``; ``lin_edge = Linear(edge_dim, 2 * out_channels)``, scale (gamma) first.

    Shapes: x (N, in_channels), edge_index (2, E) or CSRGraph, edge_attr (E, edge_dim) -> (N, out_channels), in
    x's dtype (16-bit inputs are accumulated in float32 by the kernels, the result cast back, as torch's layers).
    """

    def __init__(self, in_channels: int, out_channels: int, edge_dim: int):
        super().__init__()
        _check_sizes(type(self).__name__, in_channels=in_channels, out_channels=out_channels, edge_dim=edge_dim)
        self.in_channels, self.out_channels, self.edge_dim = in_channels, out_channels, edge_dim
        self.lin = nn.Linear(2 * in_channels, out_channels)
        self.lin_edge = nn.Linear(edge_dim, 2 * out_channels)

    def reset_parameters(self) -> None:
        """Re-initialise ``lin`` and ``lin_edge`` (``nn.Linear``'s initialisation)."""
        _reset(self.lin, self.lin_edge)

    def node_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lin([x_i, x_j]) = node_dst[i] + node_src[j]``: lin split per node, (N, out_channels) each."""
        d = self.in_channels
        return F.linear(x, self.lin.weight[:, :d], self.lin.bias), F.linear(x, self.lin.weight[:, d:])

    def forward(self, x: torch.Tensor, edge_index, edge_attr: torch.Tensor) -> torch.Tensor:
        op = type(self).__name__
        _check(op, self, x, self.in_channels, edge_attr, self.edge_dim, edge_index)
        g = _graph(op, x, edge_index)
        node_dst, node_src = self.node_terms(x)
        w, b = self.lin_edge.weight, self.lin_edge.bias
        # edge_attr stays in the caller's order: the kernel reads its rows through the CSR permutation
        out = dispatch.film_mean(edge_attr, g.rowptr, g.src, node_dst, node_src, w, b, feat_index=g.feat_index)
        return out.to(x.dtype)  # (the ops give 16-bit inputs a float32 result)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, edge_dim={self.edge_dim}"


class EdgeUpdate(nn.Module):
    r"""Edge update from the edge and its two end nodes (NiNo's edge MLP, any graph).

    .. math::
        e'_{ij} = \mathrm{lin\_out}\big(\mathrm{silu}(\mathrm{lin\_edge}(e_{ij}) + \mathrm{lin\_src}(x_j)
                  + \mathrm{lin\_dst}(x_i))\big)

    Submodules: ``lin_edge = Linear(edge_dim, hidden)``, ``lin_src``, ``lin_dst = Linear(in_channels, hidden)``,
    ``lin_out = Linear(hidden, out_channels)``; ``hidden_channels`` defaults to ``out_channels``.

    Shapes: x (N, in_channels), edge_index (2, E) or CSRGraph, edge_attr (E, edge_dim) -> (E, out_channels) in the
    order of edge_index, in x's dtype.
    """

    def __init__(self, in_channels: int, edge_dim: int, out_channels: int, hidden_channels: int | None = None):
        super().__init__()
        hidden = out_channels if hidden_channels is None else hidden_channels
        _check_sizes(
            type(self).__name__, in_channels=in_channels, edge_dim=edge_dim, out_channels=out_channels,
            hidden_channels=hidden,
        )  # fmt: skip
        self.in_channels, self.edge_dim, self.out_channels = in_channels, edge_dim, out_channels
        self.lin_edge = nn.Linear(edge_dim, hidden)
        self.lin_src = nn.Linear(in_channels, hidden)
        self.lin_dst = nn.Linear(in_channels, hidden)
        self.lin_out = nn.Linear(hidden, out_channels)

    def reset_parameters(self) -> None:
        """Re-initialise the four linear maps (``nn.Linear``'s initialisation)."""
        _reset(self.lin_edge, self.lin_src, self.lin_dst, self.lin_out)

    def pre_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias, node_src, node_dst): the pre-activation is ``W_edge e + bias + node_src[j] + node_dst[i]``."""
        bias = self.lin_edge.bias + self.lin_src.bias + self.lin_dst.bias
        return bias, F.linear(x, self.lin_src.weight), F.linear(x, self.lin_dst.weight)

    def forward(self, x: torch.Tensor, edge_index, edge_attr: torch.Tensor) -> torch.Tensor:
        op = type(self).__name__
        _check(op, self, x, self.in_channels, edge_attr, self.edge_dim, edge_index)
        bias, node_src, node_dst = self.pre_terms(x)
        w, b = self.lin_out.weight, self.lin_out.bias
        if isinstance(edge_index, CSRGraph):  # per edge, no reduction: run in CSR order, then back
            g = edge_index
            out = dispatch.edge_mlp(
                g.to_csr_order(edge_attr), g.src, g.dst, self.lin_edge.weight, bias, w, b,
                node_src=node_src, node_dst=node_dst,
            )  # fmt: skip
            return g.to_edge_order(out).to(x.dtype)
        g = _graph(op, x, edge_index)  # validated and cached; the int32 indices in the caller's order:
        src, dst = g.src.index_select(0, g.inv_perm), g.dst.index_select(0, g.inv_perm)
        out = dispatch.edge_mlp(
            edge_attr, src, dst, self.lin_edge.weight, bias, w, b, node_src=node_src, node_dst=node_dst
        )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, edge_dim={self.edge_dim}, out_channels={self.out_channels}"


class EdgeUpdateFiLMConv(nn.Module):
    r"""``conv(x_conv, edge_index, update(x, edge_index, edge_attr))`` in one fused kernel: the updated edge features
    never leave the kernel (``lin_out`` of the update is folded into the conv's ``lin_edge``).

    .. math::
        h_{ij} = \mathrm{silu}(\mathrm{lin\_edge}(e_{ij}) + \mathrm{lin\_src}(x_j) + \mathrm{lin\_dst}(x_i)), \quad
        [\gamma_{ij}, \beta_{ij}] = W_{enc} (W_{out} h_{ij} + b_{out}) + b_{enc}

    then the mean of FiLM messages as :class:`EdgeFiLMConv`. Same values and gradients as the two layers one after
    the other (up to float32 summation order). ``update``'s out_channels must be ``conv``'s edge_dim.

    Shapes: x (N, update.in_channels), x_conv (N, conv.in_channels) (default: x), edge_attr (E, update.edge_dim) ->
    (N, conv.out_channels).
    """

    def __init__(self, update: EdgeUpdate, conv: EdgeFiLMConv):
        super().__init__()
        if update.out_channels != conv.edge_dim:
            raise ValueError(
                f"{type(self).__name__}: update.out_channels ({update.out_channels}) must equal conv.edge_dim "
                f"({conv.edge_dim})"
            )
        self.update, self.conv = update, conv

    def reset_parameters(self) -> None:
        """Re-initialise ``update`` and ``conv``."""
        self.update.reset_parameters()
        self.conv.reset_parameters()

    def forward(self, x: torch.Tensor, edge_index, edge_attr: torch.Tensor, x_conv: torch.Tensor | None = None):
        op = type(self).__name__
        up, conv = self.update, self.conv
        x_conv = x if x_conv is None else x_conv
        _check(op, self, x, up.in_channels, edge_attr, up.edge_dim, edge_index)
        _check(op, self, x_conv, conv.in_channels, edge_attr, up.edge_dim, edge_index, x_name="x_conv")
        if x_conv.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: x_conv must have one row per node of x ({x.shape[0]}), got {x_conv.shape[0]}")
        g = _graph(op, x, edge_index)
        bias, node_src, node_dst = up.pre_terms(x)
        msg_dst, msg_src = conv.node_terms(x_conv)
        d = conv.out_channels
        w_enc, b_enc = conv.lin_edge.weight, conv.lin_edge.bias
        w_fold = w_enc @ up.lin_out.weight  # (2D, hidden): lin_edge(lin_out(h)) = w_fold h + b_fold
        b_fold = torch.addmv(b_enc, w_enc, up.lin_out.bias)
        out = dispatch.edge_film_mean(
            edge_attr, g.rowptr, g.src, up.lin_edge.weight, bias, None, None, node_src, node_dst, msg_dst, msg_src,
            w_fold[:d], b_fold[:d], w_fold[d:], b_fold[d:], feat_index=g.feat_index,
        )  # fmt: skip
        return out.to(x.dtype)
