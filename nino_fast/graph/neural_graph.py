"""The neural graph: a destination-sorted CSR graph with per-edge types and the parameter <-> edge map.

Shapes (E edges incl. self-loops, N nodes, F = feature slots per edge: 1, or 9 for 3x3 convs, P parameters):

- ``rowptr``  (N+1,) int64   edges of destination node n are ``rowptr[n]:rowptr[n+1]`` (CSR order)
- ``src``     (E,)   int32   source node of each edge, CSR order
- ``dst``     (E,)   int32   destination node of each edge, CSR order (redundant with rowptr; for gathers)
- ``edge_type_u8`` (E,) uint8 official edge types (1 fc, 2 bias, 3 conv, 4 norm, 5 wte, 6 wpe, 7/8/9
                              q/k/v, 10 residual, 11 head, 13 self-loop), CSR order; the stored form
- ``edge_type`` (E,) int64   the same as int64 (a property: converted on each access, 8 bytes per edge;
                              large graphs should take ``edge_type_u8[a:b].long()`` per chunk instead)
- ``perm``    (E,)   int64   CSR position -> edge position in the official construction order (a property:
                              recomputed from the blocks on each access, for tests and debugging)
- ``param_pos`` (P,) int64   flat slot ``e * F + f`` (CSR edge e, feature slot f) holding parameter p
- ``pos_w``   (N,)   int64   word-embedding position per node (0: none)
- ``lpe``     (N, k) float32 Laplacian positional encoding, or None
- ``blocks``  list[Block]    the layout (one rectangle/diagonal per entry, official order): the graph's
                              structure, used for the matrix-free LPE, its cache key and ``perm``
- ``fingerprint`` str        :func:`~.checks.fingerprint` of ``param_shapes``: which model the graph is for
                              (``check_matches`` refuses another model's ``(name, shape)`` list)

The edge order inside a destination segment is the blocks' order, self-loop last (deterministic); the official
construction order differs, which is harmless: only the multiset of (src, dst, type) and the parameter mapping
matter to the model.

Edge features (``to_edges``): parameter edges carry their parameter's history, zero-padded to F slots;
residual/head edges carry 1 and self-loops 2 in slot 0 (constants, not scaled), as the official graphs do.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .assemble import construction_order, fill, fill_dst, in_degrees
from .blocks import Block, num_nodes
from .checks import check_named_shapes, first_difference
from .checks import fingerprint as fingerprint_of
from .entries import NAMES
from .layout import HEAD, RESIDUAL, SELF_LOOP


@dataclass
class NeuralGraph:
    rowptr: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_type_u8: torch.Tensor
    param_pos: torch.Tensor
    pos_w: torch.Tensor
    max_feat_size: int
    param_shapes: list[tuple[str, tuple[int, ...]]]
    arch: str = "generic"
    lpe: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)
    fingerprint: str = ""

    def __post_init__(self) -> None:
        # graphs made by hand get the fingerprint build_graph gives; copies (copy.copy, dataclasses.replace,
        # NeuralGraph.to) pass theirs on
        if not self.fingerprint:
            self.fingerprint = fingerprint_of(self.param_shapes)

    def check_matches(self, named_shapes: list[tuple[str, tuple[int, ...]]], who: str = "nowcast") -> None:
        """Raise ValueError unless ``named_shapes`` (``[(name, shape), ...]``, ``named_parameters()`` order) is
        the list this graph was built for. The parameter count alone would let a graph of another model with
        as many parameters through, and its predictions would land on the wrong parameters."""
        named = check_named_shapes(named_shapes, who)
        if fingerprint_of(named) != self.fingerprint:
            raise ValueError(
                f"{who}: the neural graph was built for another model: "
                f"{first_difference(self.param_shapes, named)}; rebuild it with build_graph for this model"
            )

    def to(self, device: torch.device | str) -> NeuralGraph:
        """This graph with its tensors on ``device``: the graph itself if already there, else a shallow copy whose
        other fields (``fingerprint``, ``param_shapes``, ``meta``, ``blocks``, ...) are this graph's, so the copy
        still knows which model it is for."""
        if self.rowptr.device == torch.device(device):
            return self
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
        return moved

    @property
    def edge_type(self) -> torch.Tensor:
        """(E,) int64 edge types, CSR order (a fresh int64 copy of ``edge_type_u8``)."""
        return self.edge_type_u8.long()

    @property
    def perm(self) -> torch.Tensor:
        """(E,) int64 CSR position -> position in the official construction order (computed on request)."""
        return construction_order(self.blocks, self.rowptr.cpu()).to(self.rowptr.device)

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    @property
    def num_params(self) -> int:
        return self.param_pos.numel()

    def degree(self) -> torch.Tensor:
        """In-degree per node (N,) int64."""
        return self.rowptr[1:] - self.rowptr[:-1]

    def edge_index(self) -> torch.Tensor:
        """(2, E) int64 ``[src; dst]`` in CSR order (same order as ``edge_type``)."""
        return torch.stack((self.src.long(), self.dst.long()))

    # ---- features ------------------------------------------------------------------------------------------
    def edge_constants(self) -> torch.Tensor:
        """(E,) float32 slot-0 feature of structural edges: 1 for residual/head edges, 2 for self-loops, else
        0."""
        t = self.edge_type_u8
        return torch.where(t == SELF_LOOP, 2.0, torch.where((t == RESIDUAL) | (t == HEAD), 1.0, 0.0))

    def to_edges(self, states: torch.Tensor) -> torch.Tensor:
        """Parameter history ``(P, C)`` -> edge features ``(E, F * C)`` (feature index ``f * C + c``), CSR
        order."""
        if states.dim() == 1:
            states = states.unsqueeze(1)
        P, C = states.shape
        if P != self.num_params:
            raise ValueError(f"NeuralGraph.to_edges: states has {P} rows, the graph has {self.num_params} parameters")
        E, F = self.num_edges, self.max_feat_size
        out = torch.zeros(E * F, C, dtype=states.dtype, device=states.device)
        out[self.param_pos.to(states.device)] = states
        out = out.view(E, F, C)
        const = self.edge_constants().to(device=states.device, dtype=states.dtype)
        is_const = const != 0
        out[is_const, 0, :] = const[is_const].unsqueeze(1)
        return out.view(E, F * C)

    def to_vector(self, edge_values: torch.Tensor) -> torch.Tensor:
        """Per-edge, per-slot predictions ``(E, F)`` (or ``(E,)`` when F == 1) -> parameter vector
        ``(P,)``."""
        flat = edge_values.reshape(-1)
        if flat.numel() != self.num_edges * self.max_feat_size:
            raise ValueError(
                f"NeuralGraph.to_vector: expected {self.num_edges} x {self.max_feat_size} values, "
                f"got shape {tuple(edge_values.shape)}"
            )
        return flat[self.param_pos.to(flat.device)]

    def param_edge_mask(self) -> torch.Tensor:
        """(E,) bool: edges that carry at least one parameter (the ones whose prediction is used)."""
        mask = torch.zeros(self.num_edges, dtype=torch.bool)
        mask[torch.div(self.param_pos, self.max_feat_size, rounding_mode="floor")] = True
        return mask

    def __repr__(self) -> str:
        lpe = None if self.lpe is None else tuple(self.lpe.shape)
        return (
            f"NeuralGraph(arch={self.arch!r}, num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
            f"num_params={self.num_params}, max_feat_size={self.max_feat_size}, lpe={lpe})"
        )


def csr_rowptr(blocks) -> torch.Tensor:
    """(N+1,) int64 CSR row pointers of the graph described by ``blocks`` (self-loops included), O(blocks + N)."""
    n_nodes = num_nodes(blocks)
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.int64)
    torch.cumsum(in_degrees(blocks, n_nodes), 0, out=rowptr[1:])
    return rowptr


class RowRange(NamedTuple):
    """Destination rows ``[node_lo, node_hi)`` and their CSR edges ``[edge_lo, edge_hi)`` (a tuple: it unpacks as
    ``n0, n1, e0, e1``)."""

    node_lo: int
    node_hi: int
    edge_lo: int
    edge_hi: int

    @classmethod
    def whole(cls, graph: NeuralGraph) -> RowRange:
        """Every row of ``graph``."""
        return cls(0, graph.num_nodes, 0, graph.num_edges)


def row_ranges(rowptr: torch.Tensor, parts: int) -> list[RowRange]:
    """``parts`` contiguous destination-row ranges with about E / parts edges each (a row is never split), from
    the (N+1,) CSR row pointers."""
    rowptr = rowptr.cpu()
    n_nodes, n_edges = rowptr.numel() - 1, int(rowptr[-1])
    targets = torch.tensor([round(n_edges * i / parts) for i in range(parts + 1)], dtype=torch.int64)
    nodes = torch.searchsorted(rowptr, targets).clamp(max=n_nodes)
    nodes[0], nodes[-1] = 0, n_nodes
    nodes = torch.cummax(nodes, 0).values
    lo, hi = nodes[:-1], nodes[1:]
    bounds = zip(lo.tolist(), hi.tolist(), rowptr[lo].tolist(), rowptr[hi].tolist(), strict=True)
    return [RowRange(*b) for b in bounds]


def _pos_w(entries, arch: str, n_nodes: int, enabled: bool) -> torch.Tensor:
    pos_w = torch.zeros(n_nodes, dtype=torch.int64)
    if enabled:
        nm = NAMES[arch]
        for e in entries:
            if e.name.endswith(tuple(nm[k] for k in ("cls", "cls_w") if k in nm)):
                pos_w[: e.shape[0]] = torch.arange(1, min(e.shape[0], n_nodes) + 1)
                break
    return pos_w


def assemble(entries, layout, param_shapes, arch: str, pos_w_enabled: bool) -> NeuralGraph:
    """CSR graph from the layout's blocks (see :mod:`.assemble`), self-loops included, and word positions."""
    blocks = layout.blocks
    rowptr = csr_rowptr(blocks)
    n_params = sum(math.prod(s) for _, s in param_shapes)
    src, etype, param_pos = fill(blocks, entries, rowptr, n_params, layout.max_feat, layout.fdo)
    return NeuralGraph(
        rowptr=rowptr,
        src=src,
        dst=fill_dst(rowptr),
        edge_type_u8=etype,
        param_pos=param_pos,
        pos_w=_pos_w(entries, arch, rowptr.numel() - 1, pos_w_enabled),
        max_feat_size=layout.max_feat,
        param_shapes=list(param_shapes),
        arch=arch,
        blocks=blocks,
        fingerprint=fingerprint_of(param_shapes),
    )


def assemble_rows(
    entries, layout, param_shapes, arch: str, pos_w_enabled: bool, rowptr: torch.Tensor, node_lo: int, node_hi: int
) -> tuple[NeuralGraph, torch.Tensor]:
    """The destination rows ``[node_lo, node_hi)`` of :func:`assemble`'s graph, built without the rest:
    ``(part, ids)``. ``part`` has all N nodes (``rowptr`` (N+1,), ``pos_w``; rows outside the range are empty)
    and only those rows' edges, numbered from ``rowptr[node_lo]`` = 0; ``part.param_pos`` holds the slots
    (in that numbering) of the parameters ``ids`` (sorted) on those edges (int32 where the values fit).
    ``rowptr``: :func:`csr_rowptr`. ``blocks`` is left empty: the layout describes the whole graph."""
    e0, e1 = int(rowptr[node_lo]), int(rowptr[node_hi])
    n_params = sum(math.prod(s) for _, s in param_shapes)
    feat = layout.max_feat
    src, etype, (ids, pos) = fill(layout.blocks, entries, rowptr, n_params, feat, layout.fdo, node_lo, node_hi)
    part = NeuralGraph(
        rowptr=(rowptr - e0).clamp_(0, e1 - e0),
        src=src,
        dst=fill_dst(rowptr[node_lo : node_hi + 1] - e0, first=node_lo),
        edge_type_u8=etype,
        param_pos=pos,
        pos_w=_pos_w(entries, arch, rowptr.numel() - 1, pos_w_enabled),
        max_feat_size=feat,
        param_shapes=list(param_shapes),
        arch=arch,
        fingerprint=fingerprint_of(param_shapes),
    )
    return part, ids
