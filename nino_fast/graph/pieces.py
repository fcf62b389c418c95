"""The pieces of a neural graph a step works on: a row range, a graph part, and the layout of a graph too large to
hold, from which any row range's piece is assembled.

- :class:`RowRange` (defined beside :func:`~.neural_graph.row_ranges`): destination rows ``[node_lo, node_hi)``
  of a CSR graph and their edges ``[edge_lo, edge_hi)`` (contiguous, since the graph is destination-sorted). A
  streamed step's tiles, a process's rows in a sharded step and the whole graph are row ranges.
- :class:`GraphPart`: what one process of a sharded step keeps of a neural graph: its row range, the graph
  restricted to those rows' edges (``local``) and the parameters on them.
- :class:`GraphLayout`: a graph kept as its block layout and per-node arrays only (O(blocks + N) memory); the
  edges of any row range are assembled on request (:meth:`GraphLayout.piece`), bitwise those rows of
  :func:`~.build.build_graph`'s graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .neural_graph import NeuralGraph, RowRange, assemble_rows

__all__ = ["GraphLayout", "GraphPart", "RowRange"]


@dataclass(frozen=True)
class GraphPart:
    """Part ``rank`` of ``world`` of a neural graph: the destination rows ``rows`` and ``local``, the graph
    restricted to their edges.

    ``local`` has all N nodes (``rowptr`` (N+1,), ``lpe``, ``pos_w``: node states are replicated) but only the
    edges ``[rows.edge_lo, rows.edge_hi)``, numbered from 0 (rows outside ``[rows.node_lo, rows.node_hi)`` are
    empty), and ``param_pos`` holds the slots of the part's parameters only (``pos``, relative to
    ``rows.edge_lo * F``; int32 below 2^31 slots): ``local.num_params`` is the part's count.
    ``ids`` (n,): those parameters (flat indices of the whole graph's, sorted; int32 where they fit);
    ``seg`` (T+1,): ``ids[seg[t]:seg[t+1]]`` are in parameter tensor t. ``num_nodes`` / ``num_edges`` /
    ``num_params`` are the whole graph's; ``whole``: the whole graph, when the part was cut from one kept in memory
    (for predictors that run whole: WNN+, non-official GNNs)."""

    rank: int
    world: int
    rows: RowRange
    ids: torch.Tensor
    seg: tuple[int, ...]
    local: NeuralGraph
    num_nodes: int
    num_edges: int
    num_params: int
    whole: NeuralGraph | None = None

    @property
    def node_lo(self) -> int:
        return self.rows.node_lo

    @property
    def node_hi(self) -> int:
        return self.rows.node_hi

    @property
    def edge_lo(self) -> int:
        return self.rows.edge_lo

    @property
    def edge_hi(self) -> int:
        return self.rows.edge_hi

    @property
    def pos(self) -> torch.Tensor:
        """(n,) the feature slots of ``ids``, relative to the part's first edge: ``local.param_pos``."""
        return self.local.param_pos

    @property
    def shard(self) -> GraphPart:
        """The part itself (the name under which earlier versions kept its rows and parameters)."""
        return self

    @property
    def max_feat_size(self) -> int:
        return self.local.max_feat_size

    @property
    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.local.param_shapes

    def to(self, device: torch.device | str) -> GraphPart:
        """This part with ``local`` on ``device`` (see :meth:`NeuralGraph.to`)."""
        local = self.local.to(device)
        return self if local is self.local else replace(self, local=local)


@dataclass(frozen=True)
class GraphLayout:
    """A neural graph as its layout: what :func:`~.build.build_graph` assembles, without any per-edge array.

    ``nodes`` is the graph with all N nodes (``rowptr`` of zeros, ``pos_w``, ``lpe``, ``param_shapes``) and no
    edges: what the node terms of a step read. :meth:`piece` assembles the edges of destination rows
    ``[node_lo, node_hi)`` (the rows of the whole graph, bitwise: same edge order, sources, types and parameter
    slots). ``rowptr`` (N+1,) int64: the whole graph's CSR row pointers. Sizes are the whole graph's."""

    entries: list
    layout: object  # graph.layout.Layout: the blocks and how parameters sit on them
    nodes: NeuralGraph
    rowptr: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return int(self.rowptr[-1])

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.nodes.param_shapes)

    @property
    def max_feat_size(self) -> int:
        return self.nodes.max_feat_size

    @property
    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        return self.nodes.param_shapes

    @property
    def arch(self) -> str:
        return self.nodes.arch

    def degree(self) -> torch.Tensor:
        return self.rowptr[1:] - self.rowptr[:-1]

    def to(self, device: torch.device | str) -> GraphLayout:
        """This layout with its node arrays on ``device`` (tiles are assembled on the CPU and moved per tile)."""
        nodes = self.nodes.to(device)
        return self if nodes is self.nodes else replace(self, nodes=nodes)

    def piece(self, node_lo: int, node_hi: int) -> tuple[NeuralGraph, torch.Tensor]:
        """``(graph, ids)``: the rows ``[node_lo, node_hi)`` with their edges numbered from 0 (see
        :func:`~.neural_graph.assemble_rows`; ``lpe`` is the layout's) and the sorted parameter ids on them."""
        g = self.nodes
        part, ids = assemble_rows(
            self.entries, self.layout, g.param_shapes, g.arch, g.arch != "generic", self.rowptr, node_lo, node_hi
        )
        part.lpe, part.meta = g.lpe, dict(g.meta)
        return part, ids
