"""Block descriptors: every entry of a neural graph is a rectangle or a diagonal of edges, not an edge list.

A :class:`Block` stands for the edges of one entry (or, rarely, a piece of one; see ``k0``/``kstride``):

- dense: edge ``(i, j)`` for ``i < n_rows, j < n_cols`` is ``r0 + i -> c0 + j`` (``src -> dst``), enumerated
  row-major (``i`` major), which is the entry's own edge order (``in`` major, ``out`` minor);
- diagonal: edge ``i < n_rows (== n_cols)`` is ``r0 + i -> c0 + i`` (residuals, Qwen3 q/k-norm placements);
- transposed: source and destination swap (``c0 + j -> r0 + i``), the order stays (key weights).

A 100M-parameter graph has a few hundred blocks, so the whole layout is a few kilobytes; the CSR arrays are
filled block by block (:mod:`.assemble`) and the Laplacian is applied block by block (:mod:`.adjacency`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Block:
    """One rectangle (or diagonal) of edges; ``entry``: the entry it holds, ``etype``: its edge type.

    ``k0``/``kstride``: the entry's edge number of this block's edge ``(i, j)`` is ``k0 + i * kstride + j``
    (``k0 + i`` for a diagonal). A whole entry has ``k0 = 0, kstride = n_cols``; pieces only appear when the
    official type order cuts an entry (see :func:`split_by_runs`).
    """

    r0: int
    c0: int
    n_rows: int
    n_cols: int
    diag: bool = False
    transposed: bool = False
    etype: int = 0
    entry: int = -1
    k0: int = 0
    kstride: int = -1

    def __post_init__(self) -> None:
        if self.kstride < 0:
            self.kstride = self.n_cols
        if self.diag and self.n_rows != self.n_cols:
            raise ValueError(f"Block: a diagonal needs n_rows == n_cols, got {self.n_rows} x {self.n_cols}")

    @property
    def num_edges(self) -> int:
        return self.n_rows if self.diag else self.n_rows * self.n_cols

    # ---- sources and destinations (the official code edits rows [0] = sources and [1] = destinations) ------
    def src_range(self) -> tuple[int, int]:
        """[lo, hi) of the source nodes."""
        return (self.c0, self.c0 + self.n_cols) if self.transposed else (self.r0, self.r0 + self.n_rows)

    def dst_range(self) -> tuple[int, int]:
        """[lo, hi) of the destination nodes."""
        return (self.r0, self.r0 + self.n_rows) if self.transposed else (self.c0, self.c0 + self.n_cols)

    def shift_src(self, d: int) -> None:
        if self.transposed:
            self.c0 += d
        else:
            self.r0 += d

    def shift_dst(self, d: int) -> None:
        if self.transposed:
            self.r0 += d
        else:
            self.c0 += d

    def first_edge(self) -> tuple[int, int]:
        """(src, dst) of edge 0."""
        return self.src_range()[0], self.dst_range()[0]

    def last_edge(self) -> tuple[int, int]:
        """(src, dst) of the last edge."""
        return self.src_range()[1] - 1, self.dst_range()[1] - 1

    def key(self) -> tuple:
        """The structure of the block (what the graph's edges depend on), for hashing."""
        return (self.r0, self.c0, self.n_rows, self.n_cols, self.diag, self.transposed, self.etype)

    def materialize(self) -> torch.Tensor:
        """(2, num_edges) int64 ``[src; dst]`` in the block's edge order (for tests and debugging)."""
        i = torch.arange(self.n_rows)
        if self.diag:
            rows, cols = self.r0 + i, self.c0 + i
        else:
            j = torch.arange(self.n_cols)
            rows = (self.r0 + i).view(-1, 1).expand(self.n_rows, self.n_cols).reshape(-1)
            cols = (self.c0 + j).view(1, -1).expand(self.n_rows, self.n_cols).reshape(-1)
        return torch.stack((cols, rows) if self.transposed else (rows, cols))


def materialize(blocks: list[Block]) -> torch.Tensor:
    """(2, E') int64 edge list of ``blocks`` concatenated (the official construction order, without
    self-loops)."""
    if not blocks:
        return torch.zeros(2, 0, dtype=torch.int64)
    return torch.cat([b.materialize() for b in blocks], 1)


def num_nodes(blocks: list[Block]) -> int:
    """Largest node id on any edge + 1 (the official graphs have no nodes beyond their edges)."""
    hi = 0
    for b in blocks:
        if b.num_edges:
            lo_s, hi_s = b.src_range()
            lo_d, hi_d = b.dst_range()
            if min(lo_s, lo_d) < 0:
                raise ValueError(f"neural graph layout: negative node id in {b}")
            hi = max(hi, hi_s, hi_d)
    return hi


def structure_hash(blocks: list[Block], n_nodes: int, *extra) -> str:
    """sha256 over the block structure, the node count and ``extra`` (e.g. the LPE size and solver
    version)."""
    h = hashlib.sha256()
    h.update(repr((n_nodes, extra)).encode())
    for b in blocks:
        h.update(repr(b.key()).encode())
    return h.hexdigest()


def _pieces(b: Block, a: int, e: int) -> list[Block]:
    """The edges ``[a, e)`` of ``b`` (in its edge order) as at most three blocks."""

    def piece(i: int, j: int, nr: int, nc: int) -> Block:
        return Block(
            b.r0 + i,
            b.c0 + j,
            nr,
            nc,
            b.diag,
            b.transposed,
            b.etype,
            b.entry,
            b.k0 + i * b.kstride + j,
            b.kstride,
        )

    if b.diag:
        return [Block(b.r0 + a, b.c0 + a, e - a, e - a, True, b.transposed, b.etype, b.entry, b.k0 + a)]
    nc, out = b.n_cols, []
    ia, ja, ib, jb = a // nc, a % nc, e // nc, e % nc
    if ia == ib:
        return [piece(ia, ja, 1, jb - ja)]
    if ja:
        out.append(piece(ia, ja, 1, nc - ja))
        ia += 1
    if ib > ia:
        out.append(piece(ia, 0, ib - ia, nc))
    if jb:
        out.append(piece(ib, 0, 1, jb))
    return out


def split_by_runs(blocks: list[Block], types: list[int], sizes: list[int]) -> list[Block]:
    """Give ``blocks`` (construction order) the edge types of runs ``types[t] * sizes[t]`` laid end to end.

    The official graph concatenates blocks grouped by layer but lists edge types in entry order; both orders
    are the same for every real model, and then each block simply takes its entry's type. Otherwise a block
    may straddle two runs and is cut into pieces of one type each (edges and parameters unchanged).
    """
    out, pos, run, run_end = [], 0, 0, (sizes[0] if sizes else 0)
    for b in blocks:
        n, done = b.num_edges, 0
        while done < n:
            while run_end <= pos and run + 1 < len(sizes):
                run += 1
                run_end += sizes[run]
            take = min(n - done, run_end - pos)
            if take <= 0:
                raise AssertionError("neural graph layout: more edges than edge types")
            for p in _pieces(b, done, done + take) if (done, take) != (0, n) else [b]:
                p.etype = types[run]
                out.append(p)
            done += take
            pos += take
    return out
