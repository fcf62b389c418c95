"""Laplacian positional encoding (LPE) of a neural graph, deterministic, matrix-free for large graphs.

``L = I - D^{-1/2} A D^{-1/2}`` with ``A`` the binary adjacency of the undirected graph without self-loops
(duplicate and reverse edges count once), ``D`` its degrees (isolated nodes: row of the identity). The
encoding is the ``k`` eigenvectors of the smallest eigenvalues after the first (trivial) one, as the official
graphs use.

Two ways in: from an explicit edge list (``compute_lpe(src, dst, ...)``, a scipy CSR Laplacian) or from the
graph's block descriptors (``block_lpe``, :class:`~.adjacency.BlockAdjacency`: O(N x blocks) per product, no
O(E) memory). Both solve the same problem the same way: LAPACK's dense ``eigh`` for small graphs, otherwise
ARPACK with a fixed start vector on ``2I - L`` (its largest eigenpairs are L's smallest, which ARPACK finds
far faster). Every eigenvector's sign is fixed so that its largest-magnitude entry (the first such) is
positive; the same graph gives a bit-identical LPE on the same machine, whatever the number of threads: the
solvers run on one BLAS thread, because the basis LAPACK / ARPACK return for a repeated eigenvalue (GPT-2 and
Llama graphs have them) depends on the BLAS thread count, and with it the prediction (by 1e-5 to 4e-5).

``block_lpe`` caches results on disk (``$NINO_FAST_CACHE/lpe`` or ``~/.cache/nino_fast/lpe``) keyed by a
hash of the block structure, the node count, ``k`` and the solver settings, for graphs of
``CACHE_MIN_NODES`` nodes or more; ``NINO_FAST_LPE_CACHE=0`` or ``cache=False`` turns it off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._env import env_flag
from .adjacency import BlockAdjacency, shifted_normalized_operator
from .blocks import Block, structure_hash

if TYPE_CHECKING:  # scipy is imported where it is used (see adjacency.py)
    import scipy.sparse as sp

DENSE_MAX_NODES = 3000
CACHE_MIN_NODES = 50_000
TOL = 1e-10
SOLVER_VERSION = "arpack-la-shift2-v2-blas1"


def normalized_laplacian(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> sp.csr_matrix:
    """Symmetric-normalised Laplacian (float64 CSR) of the undirected, unweighted graph (self-loops
    dropped)."""
    import scipy.sparse as sp

    keep = src != dst
    a, b = src[keep].astype(np.int64), dst[keep].astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = np.unique(lo * num_nodes + hi)
    lo, hi = key // num_nodes, key % num_nodes
    rows, cols = np.concatenate((lo, hi)), np.concatenate((hi, lo))
    deg = np.bincount(rows, minlength=num_nodes).astype(np.float64)
    with np.errstate(divide="ignore"):
        dis = np.where(deg > 0, deg**-0.5, 0.0)
    vals = -dis[rows] * dis[cols]
    adj = sp.csr_matrix((vals, (rows, cols)), shape=(num_nodes, num_nodes))
    return (sp.identity(num_nodes, format="csr") + adj).tocsr()


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    if vecs.size == 0:
        return vecs
    idx = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs


def _uses_dense(num_nodes: int, m: int) -> bool:
    return num_nodes <= DENSE_MAX_NODES or m >= num_nodes - 1


def _solve(dense_lap, shifted, num_nodes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k + 1`` smallest eigenpairs of L, ascending, signs fixed; ``dense_lap()`` gives L as an array
    (small graphs), ``shifted()`` the operator ``2I - L`` (large graphs)."""
    m = min(k + 1, num_nodes)
    dense = _uses_dense(num_nodes, m)
    if not dense:
        # Imported before the thread limit is set: scipy bundles its own OpenBLAS, which a limit set before it is
        # loaded does not reach (eigsh then ran on every core, and the library's threads spun on them for ~0.1 s
        # after it: into the NiNo step that follows). The dense path needs numpy's BLAS only.
        from scipy.sparse.linalg import eigsh

    with _one_blas_thread():
        if dense:
            vals, vecs = np.linalg.eigh(dense_lap())
            vals, vecs = vals[:m], vecs[:, :m]
        else:
            v0 = np.random.default_rng(0).standard_normal(num_nodes)
            vals, vecs = eigsh(shifted(), k=m, which="LA", v0=v0, tol=TOL)
            vals = 2.0 - vals
            order = np.argsort(vals, kind="stable")
            vals, vecs = vals[order], vecs[:, order]
    return vals, _fix_signs(vecs)


def _one_blas_thread():
    """numpy's / scipy's BLAS and LAPACK limited to one thread for the block (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def laplacian_eigs(src, dst, num_nodes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k + 1`` smallest eigenpairs of the normalised Laplacian, ascending: values (k+1,), vectors
    (N, k+1)."""
    import scipy.sparse as sp

    lap = normalized_laplacian(np.asarray(src), np.asarray(dst), num_nodes)
    return _solve(lap.toarray, lambda: (2.0 * sp.identity(num_nodes, format="csr") - lap).tocsr(), num_nodes, k)


def block_laplacian_eigs(blocks: list[Block], num_nodes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``laplacian_eigs`` of the graph described by ``blocks`` (self-loops implied), matrix-free."""
    adj = BlockAdjacency(blocks, num_nodes)

    def dense_lap():
        a = adj.dense()
        deg = a.sum(1)
        with np.errstate(divide="ignore"):
            dis = np.where(deg > 0, deg**-0.5, 0.0)
        return np.eye(num_nodes) - dis[:, None] * a * dis[None, :]

    return _solve(dense_lap, lambda: shifted_normalized_operator(adj)[0], num_nodes, k)


def _encoding(vecs: np.ndarray, num_nodes: int, k: int) -> torch.Tensor:
    out = np.zeros((num_nodes, k), dtype=np.float32)
    got = vecs[:, 1 : k + 1]
    out[:, : got.shape[1]] = got
    return torch.from_numpy(out)


def compute_lpe(src, dst, num_nodes: int, k: int) -> torch.Tensor:
    """(N, k) float32 LPE from an edge list: eigenvectors 1..k of L (zero columns if the graph is too
    small)."""
    if num_nodes == 0 or k == 0:
        return torch.zeros(num_nodes, k)
    return _encoding(laplacian_eigs(src, dst, num_nodes, k)[1], num_nodes, k)


# ---- matrix-free entry point with an on-disk cache ---------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("NINO_FAST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "nino_fast") / "lpe"


def cache_key(blocks: list[Block], num_nodes: int, k: int) -> str:
    m = min(k + 1, num_nodes)
    solver = ("dense",) if _uses_dense(num_nodes, m) else (SOLVER_VERSION, TOL)
    return structure_hash(blocks, num_nodes, "lpe", k, solver)


def _cache_enabled(cache: bool | None, num_nodes: int) -> bool:
    if cache is None:
        cache = env_flag("NINO_FAST_LPE_CACHE", default=True)
    return bool(cache) and num_nodes >= CACHE_MIN_NODES


def block_lpe(blocks: list[Block], num_nodes: int, k: int, cache: bool | None = None) -> torch.Tensor:
    """(N, k) float32 LPE of the graph described by ``blocks``: eigenvectors 1..k of L, matrix-free.

    ``cache``: read/write the on-disk cache (None: on unless ``NINO_FAST_LPE_CACHE=0``; graphs under
    ``CACHE_MIN_NODES`` nodes are never cached, they are quick to solve).
    """
    if num_nodes == 0 or k == 0:
        return torch.zeros(num_nodes, k)
    path = None
    if _cache_enabled(cache, num_nodes):
        path = cache_dir() / f"{cache_key(blocks, num_nodes, k)}.npy"
        if path.is_file():
            try:
                got = np.load(path, allow_pickle=False)
                if got.shape == (num_nodes, k) and got.dtype == np.float32:
                    return torch.from_numpy(got)
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed and replaced
    out = _encoding(block_laplacian_eigs(blocks, num_nodes, k)[1], num_nodes, k)
    if path is not None:
        _write_atomic(path, out.numpy())
    return out


def _write_atomic(path: Path, array: np.ndarray) -> None:
    """Write via a temporary file and a rename, so concurrent builders never read half a file; an unwritable
    cache only costs time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
