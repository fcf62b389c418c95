"""Graph input of the nino_fast.nn layers: any ``edge_index`` (2, E) [src; dst], turned into the destination-sorted
CSR the fused ops need, once per static graph.

``CSRGraph.from_edge_index`` sorts the edges by destination (stable: edges into one node keep their order) and keeps
the permutation: the fused ops read edge features in the caller's order through it (their ``feat_index``: no copy
in CSR order is made or kept for the backward), and per-edge outputs go back with :meth:`CSRGraph.to_edge_order`.
The layers call :func:`csr_of`, which caches the result per edge_index tensor so a model of several layers on a
static graph sorts once. A cached CSR is used only while the tensor still holds the values it was built from
(compared with a copy kept beside it: one O(E) comparison per call, against the sort's O(E log E)), so no write —
in place, through ``.data``, numpy or DLPack — can make it stale; it is dropped when the tensor is freed.
Inside torch.compile the CSR is built in the graph instead (no cache, no Python-side checks); pass a
:class:`CSRGraph` built outside to keep it out of the compiled region.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["CSRGraph", "csr_of"]


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` with inverse ``inv``: backward is ``grad[inv]``."""

    @staticmethod
    def forward(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, perm)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


@dataclass(frozen=True)
class CSRGraph:
    """A graph of N nodes and E edges in destination-sorted CSR.

    rowptr: (N+1,) int64, the in-edges of node n are positions ``rowptr[n]:rowptr[n+1]``;
    src, dst: (E,) int32, source and destination of each position; perm: (E,) int64, the caller's edge at each
    position (``edge_attr[perm]`` is edge_attr in CSR order); inv_perm: (E,) int64, its inverse; in_order: the
    caller's edges were sorted by destination already (perm is the identity).
    """

    rowptr: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    in_order: bool = False

    @property
    def feat_index(self) -> torch.Tensor | None:
        """The fused ops' ``feat_index`` for edge features in the caller's order: ``perm``, or None when it is the
        identity (the rows are read in place)."""
        return None if self.in_order else self.perm

    def to_csr_order(self, edge_attr: torch.Tensor) -> torch.Tensor:
        """``edge_attr`` (E, ...) in the caller's edge order -> CSR order. Its gradient is a gather by the
        inverse permutation, not index_select's zero-filled scatter-add (the permutation is one-to-one)."""
        return _PermuteRows.apply(edge_attr, self.perm, self.inv_perm)

    def to_edge_order(self, per_edge: torch.Tensor) -> torch.Tensor:
        """A per-edge result in CSR order -> the caller's edge order (the inverse of :meth:`to_csr_order`)."""
        return _PermuteRows.apply(per_edge, self.inv_perm, self.perm)

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    @staticmethod
    def from_edge_index(edge_index: torch.Tensor, num_nodes: int, op: str = "CSRGraph") -> CSRGraph:
        """The CSR of ``edge_index`` (2, E) integer [src; dst] in any order (duplicates and self loops kept)."""
        check_edge_index(edge_index, num_nodes, op)
        src, dst = edge_index[0], edge_index[1]
        perm = torch.argsort(dst, stable=True)
        dst_sorted = dst.index_select(0, perm)
        bounds = torch.arange(num_nodes + 1, device=dst.device, dtype=dst_sorted.dtype)
        rowptr = torch.searchsorted(dst_sorted, bounds).to(torch.int64)
        positions = torch.arange(perm.numel(), device=perm.device)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = positions
        return CSRGraph(
            rowptr=rowptr,
            src=src.index_select(0, perm).to(torch.int32),
            dst=dst_sorted.to(torch.int32),
            perm=perm,
            inv_perm=inv_perm,
            in_order=not torch.compiler.is_compiling()
            and perm.device.type != "meta"
            and bool(torch.equal(perm, positions)),
        )


def check_edge_index_shape(edge_index, op: str) -> None:
    """A (2, E) tensor (PyG's layout), else an error that names the layer and says what was got."""
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"{op}: edge_index must be a (2, E) tensor or a CSRGraph, got {type(edge_index).__name__}")
    if edge_index.layout != torch.strided:
        raise TypeError(f"{op}: edge_index must be a dense (2, E) [src; dst] tensor, got layout {edge_index.layout}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{op}: edge_index must have shape (2, E) [src; dst], got {tuple(edge_index.shape)}")


def check_edge_index(edge_index: torch.Tensor, num_nodes: int, op: str) -> None:
    """Shape, dtype and range of an edge_index, with errors that name the layer, the argument and what was got."""
    check_edge_index_shape(edge_index, op)
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: edge_index must be int64 or int32, got {edge_index.dtype}")
    if edge_index.shape[1] == 0 or edge_index.device.type == "meta":  # nothing to check / no values
        return
    if torch.compiler.is_compiling():
        # no data-dependent Python branch in a traced graph: the check runs as an op when the graph runs
        ok = (edge_index.min() >= 0) & (edge_index.max() < num_nodes)
        torch._assert_async(ok, f"{op}: edge_index has entries outside [0, num_nodes)")
        return
    if int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes:
        lo, hi = int(edge_index.min()), int(edge_index.max())
        raise IndexError(f"{op}: edge_index entries must lie in [0, {num_nodes}) (num_nodes), got [{lo}, {hi}]")


_CACHE: dict[tuple, tuple] = {}  # (id, N, device) -> (copy of the edge_index's values, CSRGraph, finalizer)
_CACHE_SIZE = 16


def _plain(edge_index: torch.Tensor) -> torch.Tensor:
    """A tensor subclass (PyG's ``EdgeIndex``) as the plain tensor of its values: the CSR is built by plain ops,
    also inside torch.compile, which cannot trace the subclass's conversions."""
    if type(edge_index) is torch.Tensor:
        return edge_index
    if hasattr(type(edge_index), "as_tensor"):  # EdgeIndex's own conversion (torch.compile traces it)
        return edge_index.as_tensor()
    return edge_index.as_subclass(torch.Tensor)


def csr_of(edge_index: torch.Tensor | CSRGraph, num_nodes: int, op: str) -> CSRGraph:
    """The :class:`CSRGraph` of ``edge_index`` (a CSRGraph passes through), cached per edge_index tensor while it
    holds the same values."""
    if isinstance(edge_index, CSRGraph):
        if edge_index.num_nodes != num_nodes:
            raise ValueError(f"{op}: the CSRGraph has {edge_index.num_nodes} nodes but x has {num_nodes} rows")
        return edge_index
    check_edge_index_shape(edge_index, op)
    plain = _plain(edge_index)
    if torch.compiler.is_compiling() or edge_index.device.type == "meta":  # no values to key on
        return CSRGraph.from_edge_index(plain, num_nodes, op)
    # keyed on the tensor's identity; its finalizer drops the entry when it is freed, so an id is never reused
    # while its entry lives
    key = (id(edge_index), num_nodes, edge_index.device)
    hit = _CACHE.pop(key, None)
    if hit is not None and _same_values(hit[0], plain):
        _CACHE[key] = hit  # now the newest
        return hit[1]
    values = plain.detach().clone()
    graph = CSRGraph.from_edge_index(values, num_nodes, op)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))[2].detach()  # the least recently used entry
    finalizer = hit[2] if hit is not None else weakref.finalize(edge_index, _CACHE.pop, key, None)
    _CACHE[key] = (values, graph, finalizer)
    return graph


def _same_values(kept: torch.Tensor, edge_index: torch.Tensor) -> bool:
    return kept.dtype == edge_index.dtype and kept.shape == edge_index.shape and torch.equal(kept, edge_index)
