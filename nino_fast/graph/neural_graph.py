"""The neural graph: a destination-sorted CSR graph with per-edge types and the parameter <-> edge-feature map.

Shapes (E edges incl. self-loops, N nodes, F = feature slots per edge: 1, or 9 for 3x3 convs, P parameters):

- ``rowptr``  (N+1,) int64   edges of destination node n are ``rowptr[n]:rowptr[n+1]`` (CSR order)
- ``src``     (E,)   int32   source node of each edge, CSR order
- ``dst``     (E,)   int32   destination node of each edge, CSR order (redundant with rowptr; kept for gathers)
- ``edge_type`` (E,) int64   official edge types (1 fc, 2 bias, 3 conv, 4 norm, 5 wte, 6 wpe, 7/8/9 q/k/v,
                              10 residual, 11 head, 13 self-loop), CSR order
- ``perm``    (E,)   int64   CSR position -> edge position in the official construction order
- ``param_pos`` (P,) int64   flat slot ``e * F + f`` (CSR edge e, feature slot f) holding parameter p
- ``pos_w``   (N,)   int64   word-embedding position per node (0: none)
- ``lpe``     (N, k) float32 Laplacian positional encoding, or None

Edge features (``to_edges``): parameter edges carry their parameter's history, zero-padded to F slots;
residual/head edges carry 1 and self-loops 2 in slot 0 (constants, not scaled), as the official graphs do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .layout import HEAD, RESIDUAL, SELF_LOOP


@dataclass
class NeuralGraph:
    rowptr: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_type: torch.Tensor
    perm: torch.Tensor
    param_pos: torch.Tensor
    pos_w: torch.Tensor
    max_feat_size: int
    param_shapes: list[tuple[str, tuple[int, ...]]]
    arch: str = "generic"
    lpe: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    # ---- sizes --------------------------------------------------------------------------------------------------
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

    # ---- features -----------------------------------------------------------------------------------------------
    def edge_constants(self) -> torch.Tensor:
        """(E,) float32 slot-0 feature of structural edges: 1 for residual/head edges, 2 for self-loops, else 0."""
        t = self.edge_type
        return torch.where(t == SELF_LOOP, 2.0, torch.where((t == RESIDUAL) | (t == HEAD), 1.0, 0.0))

    def to_edges(self, states: torch.Tensor) -> torch.Tensor:
        """Parameter history ``(P, C)`` -> edge features ``(E, F * C)`` (feature index ``f * C + c``), CSR order."""
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
        """Per-edge, per-slot predictions ``(E, F)`` (or ``(E,)`` when F == 1) -> parameter vector ``(P,)``."""
        flat = edge_values.reshape(-1)
        if flat.numel() != self.num_edges * self.max_feat_size:
            raise ValueError(f"NeuralGraph.to_vector: expected {self.num_edges} x {self.max_feat_size} values, "
                             f"got shape {tuple(edge_values.shape)}")
        return flat[self.param_pos.to(flat.device)]

    def param_edge_mask(self) -> torch.Tensor:
        """(E,) bool: edges that carry at least one parameter (the ones whose prediction is used)."""
        mask = torch.zeros(self.num_edges, dtype=torch.bool)
        mask[torch.div(self.param_pos, self.max_feat_size, rounding_mode="floor")] = True
        return mask

    def __repr__(self) -> str:
        lpe = None if self.lpe is None else tuple(self.lpe.shape)
        return (f"NeuralGraph(arch={self.arch!r}, num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
                f"num_params={self.num_params}, max_feat_size={self.max_feat_size}, lpe={lpe})")


def assemble(entries, layout, param_shapes, arch: str, pos_w_enabled: bool) -> NeuralGraph:
    """Concatenate the placed blocks in the official order, add self-loops, sort by destination into CSR."""
    from .layout import _split  # same (layer, key) split as the placement

    # The official graph concatenates blocks grouped by layer (first-seen order), and the types per entry in entry
    # order; both orders coincide for every supported architecture, and are reproduced as is otherwise.
    starts, edges, pos = {}, [], 0
    for layer, keys in layout.blocks.items():
        for key, blk in keys.items():
            starts[(layer, key)] = pos
            edges.append(blk)
            pos += blk.shape[1]
    edge_index = torch.cat(edges, 1) if edges else torch.zeros(2, 0, dtype=torch.int64)
    sizes = [e.shape[0] * (e.shape[1] if len(e.shape) > 1 else 1) for e in entries]  # edges per block
    types = torch.cat([torch.full((n,), t) for n, t in zip(sizes, layout.types)]) if entries else torch.zeros(0, dtype=torch.int64)
    n_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
    if types.numel() != edge_index.shape[1]:
        raise AssertionError(f"layout produced {edge_index.shape[1]} edges but {types.numel()} types")
    loops = torch.arange(n_nodes)
    edge_index = torch.cat((edge_index, torch.stack((loops, loops))), 1)
    types = torch.cat((types, torch.full((n_nodes,), SELF_LOOP)))

    F = layout.max_feat
    n_params = sum(math.prod(s) for _, s in param_shapes)
    slot_of_param = torch.full((n_params,), -1, dtype=torch.int64)
    fdo = layout.fdo
    for e in entries:
        if e.index is None:
            continue
        idx = e.index
        if idx.dim() > 2:
            idx = idx.flatten(2)
        elif idx.dim() == 1:
            idx = idx.view(-1, 1, 1)
        else:
            idx = idx.unsqueeze(2)
        if fdo:
            idx = idx.permute(1, 0, 2)  # the graph stores weights as (in, out)
        idx = idx.reshape(-1, idx.shape[2])
        start = starts[_split(e.name)]
        e_pos = torch.arange(start, start + idx.shape[0]).unsqueeze(1)
        slot_of_param[idx] = e_pos * F + torch.arange(idx.shape[1]).unsqueeze(0)
    missing = (slot_of_param < 0).nonzero().flatten()
    if missing.numel():
        raise AssertionError(f"build_graph({arch}): {missing.numel()} parameters are not on any edge")

    dst = edge_index[1]
    order = torch.sort(dst, stable=True).indices
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    slot_edge = torch.div(slot_of_param, F, rounding_mode="floor")
    param_pos = inv[slot_edge] * F + slot_of_param % F
    counts = torch.bincount(dst, minlength=n_nodes)
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.int64)
    rowptr[1:] = torch.cumsum(counts, 0)

    pos_w = torch.zeros(n_nodes, dtype=torch.int64)
    if pos_w_enabled:
        from .entries import NAMES

        nm = NAMES[arch]
        for e in entries:
            if e.name.endswith(tuple(nm[k] for k in ("cls", "cls_w") if k in nm)):
                pos_w[: e.shape[0]] = torch.arange(1, min(e.shape[0], n_nodes) + 1)
                break
    return NeuralGraph(
        rowptr=rowptr,
        src=edge_index[0][order].to(torch.int32),
        dst=dst[order].to(torch.int32),
        edge_type=types[order],
        perm=order,
        param_pos=param_pos,
        pos_w=pos_w,
        max_feat_size=F,
        param_shapes=list(param_shapes),
        arch=arch,
    )
