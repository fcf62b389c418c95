"""Laplacian positional encoding (LPE) of a neural graph, deterministic.

``L = I - D^{-1/2} A D^{-1/2}`` with ``A`` the binary adjacency of the undirected graph without self-loops
(duplicate and reverse edges count once), ``D`` its degrees (isolated nodes: row of the identity). The encoding is
the ``k`` eigenvectors of the smallest eigenvalues after the first (trivial) one, as the official graphs use.

Determinism: the same graph gives bit-identical LPE. Small graphs use LAPACK's dense ``eigh``; larger ones ARPACK
with a fixed start vector on ``2I - L`` (its largest eigenpairs are L's smallest, which ARPACK finds far faster).
Every eigenvector's sign is fixed so that its largest-magnitude entry (the first such) is positive.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

DENSE_MAX_NODES = 3000


def normalized_laplacian(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> sp.csr_matrix:
    """Symmetric-normalised Laplacian (float64 CSR) of the undirected, unweighted graph (self-loops dropped)."""
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


def laplacian_eigs(src, dst, num_nodes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k + 1`` smallest eigenpairs of the normalised Laplacian, ascending: (values (k+1,), vectors (N, k+1))."""
    lap = normalized_laplacian(np.asarray(src), np.asarray(dst), num_nodes)
    m = min(k + 1, num_nodes)
    if num_nodes <= DENSE_MAX_NODES or m >= num_nodes - 1:
        vals, vecs = np.linalg.eigh(lap.toarray())
        vals, vecs = vals[:m], vecs[:, :m]
    else:
        from scipy.sparse.linalg import eigsh

        shifted = (2.0 * sp.identity(num_nodes, format="csr") - lap).tocsr()
        v0 = np.random.default_rng(0).standard_normal(num_nodes)
        vals, vecs = eigsh(shifted, k=m, which="LA", v0=v0, tol=1e-10)
        vals = 2.0 - vals
        order = np.argsort(vals, kind="stable")
        vals, vecs = vals[order], vecs[:, order]
    return vals, _fix_signs(vecs)


def compute_lpe(src, dst, num_nodes: int, k: int) -> torch.Tensor:
    """(N, k) float32 LPE: eigenvectors 1..k of the normalised Laplacian (zero columns if the graph is too small)."""
    out = np.zeros((num_nodes, k), dtype=np.float32)
    if num_nodes == 0 or k == 0:
        return torch.from_numpy(out)
    _, vecs = laplacian_eigs(src, dst, num_nodes, k)
    got = vecs[:, 1 : k + 1]
    out[:, : got.shape[1]] = got
    return torch.from_numpy(out)
