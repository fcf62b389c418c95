"""CSR assembly straight from block descriptors: no (2, E) edge list, no sort.

1. In-degrees: each block adds ``n_rows`` to its destination columns (``n_cols`` to its destination rows when
   transposed, 1 for a diagonal) -- a difference array over ranges, O(blocks + N); ``rowptr`` is its cumsum.
2. Fill: blocks are visited in construction order, each owning a run of slots in every destination segment
   that starts at that node's cursor: a dense block writes ``src[base[c] + i] = r0 + i`` for its column ``c``
   and row ``i`` (transposed: ``src[base[r] + j] = c0 + j``), a diagonal one slot per node. Self-loops come
   last in each segment. The order inside a segment is therefore fixed (deterministic) but differs from the
   official order; only the multiset of ``(src, dst, type)`` and the parameter mapping must match, and they
   do.
3. Parameter map: the parameter at the entry's edge ``k`` (see :mod:`.entries`, :class:`~.blocks.Block`), slot
   ``f`` goes to ``param_pos = csr_position(k) * F + f``, computed in the same pass from the block's (i, j).

Everything runs in chunks of at most ``CHUNK`` edges, so temporaries stay ~16 MB per int64 array whatever the
size of the graph; the outputs (src/dst int32, edge types uint8, param_pos int64) are the only O(E)
allocations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .blocks import Block
from .entries import Entry

CHUNK = 1 << 21  # edges per vectorised step (16 MB per int64 temporary)
SELF_LOOP_TYPE = 13


def in_degrees(blocks: list[Block], n_nodes: int) -> torch.Tensor:
    """(N,) int64 in-degree, self-loops included."""
    diff = torch.zeros(n_nodes + 1, dtype=torch.int64)
    for b in blocks:
        lo, hi = b.dst_range()
        per = 1 if b.diag else (b.n_cols if b.transposed else b.n_rows)
        diff[lo] += per
        diff[hi] -= per
    return torch.cumsum(diff[:-1], 0) + 1


def walk(
    blocks: list[Block], rowptr: torch.Tensor, node_lo: int = 0, node_hi: int | None = None
) -> Iterator[tuple[Block, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(block, I, J, pos)`` chunk by chunk: ``pos`` a contiguous 2-D int64 array of CSR positions,
    ``I`` and ``J`` the block's row and column numbers broadcastable to it (edge ``(I, J)`` sits at ``pos``;
    for a diagonal ``J`` is ``I``). Untransposed dense chunks are laid out (columns, rows) so that memory runs
    over consecutive slots of one destination segment: scattering in that order is several times faster than
    jumping between segments. The self-loop slots (the cursor left after all blocks) come last with
    ``block=None``. Only the edges into destination nodes ``[node_lo, node_hi)`` are yielded (default: all);
    the cursors of all nodes are still advanced (O(N) per block), so positions are those of the whole graph.
    """
    node_hi = rowptr.numel() - 1 if node_hi is None else node_hi
    cursor = rowptr[:-1].clone()
    for b in blocks:
        lo, hi = b.dst_range()
        base = cursor[lo:hi].clone()
        cursor[lo:hi] += 1 if b.diag else (b.n_cols if b.transposed else b.n_rows)
        a, z = max(lo, node_lo) - lo, min(hi, node_hi) - lo  # the block's destinations lo + [a, z)
        if z <= a:
            continue
        if b.diag:
            for i0 in range(a, z, CHUNK):
                i = torch.arange(i0, min(z, i0 + CHUNK)).unsqueeze(1)
                yield b, i, i, base[i0 : i0 + i.shape[0]].unsqueeze(1)
            continue
        # destinations are the block's rows when transposed, else its columns
        (r0, r1), (c0, c1) = ((a, z), (0, b.n_cols)) if b.transposed else ((0, b.n_rows), (a, z))
        cj = min(c1 - c0, CHUNK)
        ci = max(1, CHUNK // cj)
        for j0 in range(c0, c1, cj):
            j = torch.arange(j0, min(c1, j0 + cj))
            for i0 in range(r0, r1, ci):
                i = torch.arange(i0, min(r1, i0 + ci))
                if b.transposed:  # destination r0 + i, slots base[i] + j: (rows, columns)
                    ii, jj = i.unsqueeze(1), j.unsqueeze(0)
                    pos = base[i0 : i0 + i.numel()].unsqueeze(1) + jj
                else:  # destination c0 + j, slots base[j] + i: (columns, rows)
                    ii, jj = i.unsqueeze(0), j.unsqueeze(1)
                    pos = base[j0 : j0 + j.numel()].unsqueeze(1) + ii
                yield b, ii, jj, pos
    yield None, torch.arange(node_lo, node_hi).unsqueeze(1), None, cursor[node_lo:node_hi].unsqueeze(1)


def edge_numbers(b: Block, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Entry edge number ``k`` of the block's edges ``(i, j)`` (broadcast of ``i`` and ``j``)."""
    return b.k0 + i if b.diag else b.k0 + i * b.kstride + j


def sources(b: Block, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Source node of the block's edges ``(i, j)`` (broadcastable)."""
    if b.diag:
        return (b.c0 if b.transposed else b.r0) + i
    return b.c0 + j if b.transposed else b.r0 + i


def _param_layout(e: Entry, fdo: bool) -> tuple[int, int, int, int, int, int]:
    """(offset, B, sA, sB, sF, F') of the entry's parameters in edge order: edge ``k``, slot ``f`` holds
    parameter ``offset + (k // B) * sA + (k % B) * sB + f * sF`` (the official ``index.permute(1, 0, 2)`` for
    (out, in) weights).
    """
    p = e.params
    shape, strides = p.shape, p.strides
    if len(shape) == 1:
        dims = [(shape[0], strides[0]), (1, 0), (1, 0)]
    elif len(shape) == 2:
        dims = [(shape[0], strides[0]), (shape[1], strides[1]), (1, 0)]
    else:  # kernels flattened into feature slots: the trailing dims must be contiguous among themselves
        f = math.prod(shape[2:])
        if f > 1 and any(strides[d] != strides[d + 1] * shape[d + 1] for d in range(2, len(shape) - 1)):
            raise AssertionError(f"build_graph: entry {e.name}: trailing parameter dims are not contiguous")
        dims = [(shape[0], strides[0]), (shape[1], strides[1]), (f, strides[-1])]
    if fdo:
        dims[0], dims[1] = dims[1], dims[0]
    return p.offset, dims[1][0], dims[0][1], dims[1][1], dims[2][1], dims[2][0]


def _param_ids(b: Block, i: torch.Tensor, j: torch.Tensor, off: int, nb: int, sa: int, sb: int) -> torch.Tensor:
    """Flat index of the parameter (slot 0) on the block's edges ``(i, j)``:
    ``off + (k // B) sA + (k % B) sB``."""
    if not b.diag and nb == b.kstride and b.k0 % nb == 0:
        return (off + (b.k0 // nb) * sa + i * sa) + j * sb  # block row i is parameter row k // B
    i_flat = i.reshape(-1)
    n = i_flat.numel() * (1 if b.diag else b.n_cols)
    rows_whole = b.diag or (j.numel() == b.n_cols and b.kstride == b.n_cols)
    if not rows_whole or nb > n:
        k = edge_numbers(b, i, j)
        return off + torch.div(k, nb, rounding_mode="floor") * sa + (k % nb) * sb
    # the chunk's edge numbers are one contiguous range: cut it out of the (k // B, k % B) grid (at most 3x
    # the chunk), no division
    k_lo = b.k0 + int(i_flat[0]) * (1 if b.diag else b.kstride)
    a0, a1 = k_lo // nb, (k_lo + n - 1) // nb + 1
    grid = off + torch.arange(a0, a1).unsqueeze(1) * sa + torch.arange(nb).unsqueeze(0) * sb
    ids = grid.reshape(-1)[k_lo - a0 * nb : k_lo - a0 * nb + n]
    if b.diag:
        return ids.view(i.shape)
    ids = ids.view(i_flat.numel(), b.n_cols)  # (rows, columns), the block's own order
    return ids if b.transposed else ids.t()  # see walk: untransposed chunks are laid out (columns, rows)


def fill(
    blocks: list[Block],
    entries: list[Entry],
    rowptr: torch.Tensor,
    n_params: int,
    feat: int,
    fdo: bool,
    node_lo: int = 0,
    node_hi: int | None = None,
):
    """(src int32, edge type uint8, param_pos int64) in CSR order; see the module docstring.

    Given ``node_hi``, for the destination rows ``[node_lo, node_hi)`` only: the CSR slots of those rows,
    ``rowptr[node_lo]:rowptr[node_hi]``, numbered from 0, and instead of ``param_pos`` the pair ``(ids, pos)``
    (sorted by ``ids``; int32 where the values fit, else int64): the parameters on those edges and their slots
    ``e * F + f`` in that numbering.
    """
    whole = node_hi is None
    e0 = int(rowptr[node_lo])
    n_edges = int(rowptr[-1] if node_hi is None else rowptr[node_hi]) - e0
    src = torch.empty(n_edges, dtype=torch.int32)
    etype = torch.empty(n_edges, dtype=torch.uint8)
    param_pos = torch.full((n_params if whole else 0,), -1, dtype=torch.int64)
    part_ids: list[torch.Tensor] = []
    part_pos: list[torch.Tensor] = []
    id_type = torch.int32 if n_params < 2**31 else torch.int64
    pos_type = torch.int32 if n_edges * feat < 2**31 else torch.int64
    # numpy views: fancy assignment broadcasts the (row or column) values without materialising them and is
    # ~2x faster than torch's index_put_ on CPU
    src_np, etype_np, param_pos_np = src.numpy(), etype.numpy(), param_pos.numpy()
    layouts: dict[int, tuple] = {}
    for b, i, j, pos in walk(blocks, rowptr, node_lo, node_hi):
        at = pos.numpy() if e0 == 0 else pos.sub(e0).numpy()
        if b is None:  # self-loops
            src_np[at] = i.to(torch.int32).numpy()
            etype_np[at] = SELF_LOOP_TYPE
            continue
        src_np[at] = sources(b, i, j).to(torch.int32).numpy()
        etype_np[at] = b.etype
        e = entries[b.entry]
        if e.params is None:
            continue
        if b.entry not in layouts:
            layouts[b.entry] = _param_layout(e, fdo)
        off, nb, sa, sb, sf, nf = layouts[b.entry]
        ids = _param_ids(b, i, j, off, nb, sa, sb).expand_as(pos)
        for f in range(nf):
            slots = at * feat + f if feat > 1 else at
            if whole:
                param_pos_np[ids.numpy() + f * sf if f else ids.numpy()] = slots
            else:  # 4 bytes each while collecting where they fit
                part_ids.append((ids + f * sf).reshape(-1).to(id_type))
                part_pos.append(torch.from_numpy(slots).reshape(-1).to(pos_type))
    if not whole:
        ids = torch.cat([torch.zeros(0, dtype=id_type), *part_ids])
        pos = torch.cat([torch.zeros(0, dtype=pos_type), *part_pos])
        del part_ids, part_pos
        order = torch.argsort(ids)
        return src, etype, (ids[order], pos[order])
    if n_params and int(param_pos.min()) < 0:
        missing = int((param_pos < 0).sum())
        raise AssertionError(f"build_graph: {missing} parameters are not on any edge")
    return src, etype, param_pos


def fill_dst(rowptr: torch.Tensor, first: int = 0) -> torch.Tensor:
    """(E,) int32 destination of each CSR slot, written a chunk of nodes at a time; ``rowptr`` may be that of
    the rows ``first, first + 1, ...`` of a larger graph (then the destinations start at ``first``)."""
    n = rowptr.numel() - 1
    n_edges = int(rowptr[-1])
    dst = torch.empty(n_edges, dtype=torch.int32)
    deg = rowptr[1:] - rowptr[:-1]
    # node boundaries so that each chunk holds about CHUNK edges (a single node may hold more)
    cuts = torch.searchsorted(rowptr, torch.arange(0, n_edges, CHUNK), right=True) - 1
    bounds = sorted(set(cuts.clamp(0, n).tolist()) | {0, n})
    for a, z in zip(bounds[:-1], bounds[1:], strict=True):
        if z > a:
            dst[int(rowptr[a]) : int(rowptr[z])] = torch.repeat_interleave(
                torch.arange(first + a, first + z, dtype=torch.int32), deg[a:z], output_size=int(rowptr[z] - rowptr[a])
            )
    return dst


def construction_order(blocks: list[Block], rowptr: torch.Tensor) -> torch.Tensor:
    """(E,) int64 ``perm``: CSR position -> edge position in the official construction order (blocks
    concatenated, then one self-loop per node). Recomputed on each call; O(E) time and memory."""
    n_edges = int(rowptr[-1])
    perm = torch.empty(n_edges, dtype=torch.int64)
    starts, s = {}, 0
    for b in blocks:
        starts[id(b)] = s
        s += b.num_edges
    perm_np = perm.numpy()
    for b, i, j, pos in walk(blocks, rowptr):
        if b is None:
            value = s + i
        else:
            value = starts[id(b)] + (i if b.diag else i * b.n_cols + j)
        perm_np[pos.numpy()] = value.numpy()
    return perm
