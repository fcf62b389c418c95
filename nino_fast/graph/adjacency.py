"""The undirected adjacency of a neural graph, applied from its block descriptors (never materialised).

``A`` is the binary adjacency the LPE uses (the PyG coalesced undirected graph of the official code): an edge
present in several blocks, or in both directions, counts once; self-loops are dropped.

Dense blocks: cut the node line at every dense block's row/column boundary into K elementary intervals. Each
dense block covers whole cells ``I_a x I_b``, so the union of all dense blocks, made symmetric, is a K x K
boolean matrix ``Z`` -- overlaps (q vs transposed k, duplicate edges, ...) count once because ``Z`` is an OR:

    (A_dense x)_u = sum_b Z[a(u), b] * sum_{v in I_b} x_v  -  Z[a(u), a(u)] * x_u      (no self-loops)

Diagonal blocks (pairs ``{r0 + i, c0 + i}``) are cut at the same boundaries; a piece in a cell already covered
by ``Z`` is dropped, the rest are normalised to ``{u, u + d}`` (d > 0) and merged per ``d`` into disjoint
runs, so each diagonal edge also counts once. A matvec costs O(N + K^2 + diagonal edges); the structure is
O(K^2 + blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .blocks import Block

if TYPE_CHECKING:  # scipy is imported where it is used: a process that never computes an LPE skips its ~20 MB
    from scipy.sparse.linalg import LinearOperator

DENSE_CELLS_MAX = 2048  # up to this many intervals Z is a dense K x K array, beyond a sparse matrix


class BlockAdjacency:
    """``A`` of ``blocks`` on ``n_nodes`` nodes. ``matvec``/``matmat``: A x for x (N,) or (N, m) float64."""

    def __init__(self, blocks: list[Block], n_nodes: int):
        self.n = n = int(n_nodes)
        dense = [b for b in blocks if not b.diag and b.num_edges]
        cuts = {0, n}
        for b in dense:
            cuts.update((b.r0, b.r0 + b.n_rows, b.c0, b.c0 + b.n_cols))
        self.bounds = bnd = np.array(sorted(c for c in cuts if 0 <= c <= n), dtype=np.int64)
        if bnd[0] != 0 or bnd[-1] != n:
            raise ValueError(f"BlockAdjacency: blocks reach outside [0, {n})")
        self.lens = np.diff(bnd)
        k = self.lens.size
        cells = [
            (*np.searchsorted(bnd, (b.r0, b.r0 + b.n_rows)), *np.searchsorted(bnd, (b.c0, b.c0 + b.n_cols)))
            for b in dense
        ]
        if k <= DENSE_CELLS_MAX:
            z = np.zeros((k, k), dtype=bool)
            for ra, rb, ca, cb in cells:
                z[ra:rb, ca:cb] = True
            self.zf = (z | z.T).astype(np.float64)
        else:  # many blocks (very deep generic nets): a K x K dense array would be large, Z is sparse
            rows = [np.repeat(np.arange(ra, rb), cb - ca) for ra, rb, ca, cb in cells]
            cols = [np.tile(np.arange(ca, cb), rb - ra) for ra, rb, ca, cb in cells]
            r, c = (
                np.concatenate([np.zeros(0, np.int64), *rows]),
                np.concatenate([np.zeros(0, np.int64), *cols]),
            )
            import scipy.sparse as sp

            z = sp.coo_matrix((np.ones(r.size), (r, c)), shape=(k, k)).tocsr()
            self.zf = ((z + z.T) > 0).astype(np.float64).tocsr()
        self.self_cell = np.repeat(self.zf.diagonal(), self.lens)  # 1 where the node's own cell is covered
        self.diags = self._diagonal_runs([b for b in blocks if b.diag and b.num_edges])

    def _cell(self, u: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, u, side="right") - 1

    def _diagonal_runs(self, diags: list[Block]) -> list[tuple[int, int, int]]:
        """Disjoint ``(u0, length, d)`` runs of diagonal edges ``{u, u + d}`` not covered by dense blocks."""
        pieces: dict[int, list[tuple[int, int]]] = {}
        for b in diags:
            d = b.c0 - b.r0
            if d == 0:
                continue  # self-loops
            pts = np.concatenate((self.bounds - b.r0, self.bounds - b.c0, [0, b.n_rows]))
            pts = np.unique(pts[(pts >= 0) & (pts <= b.n_rows)])
            starts, ends = pts[:-1], pts[1:]
            covered = np.asarray(self.zf[self._cell(b.r0 + starts), self._cell(b.c0 + starts)]).ravel() > 0
            lo = min(b.r0, b.c0)
            for s, e in zip(starts[~covered].tolist(), ends[~covered].tolist(), strict=True):
                pieces.setdefault(abs(d), []).append((lo + s, lo + e))
        runs = []
        for d in sorted(pieces):
            cur_s = cur_e = None
            for s, e in sorted(pieces[d]):
                if cur_e is not None and s <= cur_e:
                    cur_e = max(cur_e, e)
                    continue
                if cur_e is not None:
                    runs.append((cur_s, cur_e - cur_s, d))
                cur_s, cur_e = s, e
            if cur_e is not None:
                runs.append((cur_s, cur_e - cur_s, d))
        return runs

    @property
    def num_undirected_edges(self) -> int:
        """Edges of the deduplicated undirected graph (each pair once)."""
        r, c = self.zf.nonzero()
        pairs = int((self.lens[r] * self.lens[c]).sum() - self.lens[r[r == c]].sum())
        return pairs // 2 + sum(length for _, length, _ in self.diags)

    def matmat(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        vec = x.ndim == 1
        x2 = x.reshape(self.n, -1)
        sums = np.add.reduceat(x2, self.bounds[:-1], axis=0) if self.n else np.zeros((0, x2.shape[1]))
        y = np.repeat(self.zf @ sums, self.lens, axis=0)
        y -= self.self_cell[:, None] * x2
        for u0, length, d in self.diags:
            y[u0 : u0 + length] += x2[u0 + d : u0 + d + length]
            y[u0 + d : u0 + d + length] += x2[u0 : u0 + length]
        return y[:, 0] if vec else y

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.matmat(x)

    def degrees(self) -> np.ndarray:
        """(N,) float64 degree in the deduplicated undirected graph."""
        return self.matvec(np.ones(self.n))

    def dense(self) -> np.ndarray:
        """(N, N) float64 explicit ``A`` (small graphs: the dense solver and tests)."""
        cell = np.repeat(np.arange(self.lens.size), self.lens)
        zf = self.zf if isinstance(self.zf, np.ndarray) else self.zf.toarray()
        a = zf[np.ix_(cell, cell)]
        np.fill_diagonal(a, 0.0)
        for u0, length, d in self.diags:
            u = np.arange(u0, u0 + length)
            a[u, u + d] = a[u + d, u] = 1.0
        return a


def shifted_normalized_operator(adj: BlockAdjacency) -> tuple[LinearOperator, np.ndarray]:
    """``2I - L = I + D^-1/2 A D^-1/2`` as a LinearOperator (isolated nodes: identity rows), and
    ``D^-1/2``."""
    from scipy.sparse.linalg import LinearOperator

    deg = adj.degrees()
    with np.errstate(divide="ignore"):
        dis = np.where(deg > 0, deg**-0.5, 0.0)

    def mm(x):
        x = np.asarray(x, dtype=np.float64)
        d = dis if x.ndim == 1 else dis[:, None]
        return x + d * adj.matmat(d * x)

    return LinearOperator((adj.n, adj.n), matvec=mm, matmat=mm, dtype=np.float64), dis
