"""Laplacian positional encoding: true eigenvectors (residuals, eigenvalues vs a dense solver), deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nino_fast import build_graph
from nino_fast.graph import lpe as lpe_mod
from nino_fast.graph import normalized_laplacian

from golden import load


def _check_eigvecs(graph, enc, k):
    lap = normalized_laplacian(graph.src.numpy(), graph.dst.numpy(), graph.num_nodes).toarray()
    dense_vals = np.linalg.eigvalsh(lap)
    v = enc.double().numpy()
    rayleigh = np.einsum("nk,nm,mk->k", v, lap, v)
    resid = np.linalg.norm(lap @ v - v * rayleigh, axis=0)
    assert resid.max() < 1e-4
    assert np.allclose(np.linalg.norm(v, axis=0), 1, atol=1e-5)
    assert np.allclose(rayleigh, dense_vals[1 : k + 1], atol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "gpt2", "convnet"])
def test_lpe_is_eigenbasis(case):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=8, **g["kwargs"])
    assert graph.lpe.shape == (graph.num_nodes, 8) and graph.lpe.dtype == torch.float32
    _check_eigvecs(graph, graph.lpe, 8)
    again = build_graph(g["named"], arch=g["arch"], lpe=8, **g["kwargs"])
    assert torch.equal(graph.lpe, again.lpe)  # bit-identical run to run


def test_lpe_same_eigenvalues_as_official():
    """The official LPE (golden) spans eigenvectors of the same eigenvalues as ours."""
    g = load("llama")
    graph = build_graph(g["named"], arch="llama", lpe=8, **g["kwargs"])
    lap = normalized_laplacian(graph.src.numpy(), graph.dst.numpy(), graph.num_nodes).toarray()
    theirs = g["lpe"].astype(np.float64)
    ray_theirs = np.einsum("nk,nm,mk->k", theirs, lap, theirs)
    mine = graph.lpe.double().numpy()
    ray_mine = np.einsum("nk,nm,mk->k", mine, lap, mine)
    assert np.allclose(np.sort(ray_theirs), np.sort(ray_mine), atol=1e-4)


def test_sparse_solver_path(monkeypatch):
    """Graphs above the dense threshold use ARPACK: same eigen-quality, still deterministic, signs fixed."""
    g = load("gpt2")
    monkeypatch.setattr(lpe_mod, "DENSE_MAX_NODES", 50)
    graph = build_graph(g["named"], arch="gpt2", lpe=4, **g["kwargs"])
    _check_eigvecs(graph, graph.lpe, 4)
    assert torch.equal(graph.lpe, build_graph(g["named"], arch="gpt2", lpe=4, **g["kwargs"]).lpe)
    v = graph.lpe.numpy()
    assert (v[np.abs(v).argmax(0), np.arange(4)] > 0).all()


def test_tiny_and_disabled():
    tiny = build_graph([("w.weight", (1, 1))], lpe=8)  # 2 nodes: only one non-trivial eigenvector exists
    assert tiny.lpe.shape == (2, 8) and bool((tiny.lpe[:, 2:] == 0).all())
    assert build_graph([("w.weight", (2, 2))], lpe=0).lpe is None
    given = torch.randn(4, 3)
    assert torch.equal(build_graph([("w.weight", (2, 2))], lpe=given).lpe, given)


def test_lpe_does_not_depend_on_the_blas_thread_count():
    """GPT-2 graphs have repeated eigenvalues: the basis LAPACK returns for them moved with OpenBLAS's thread
    count (by up to 0.65), and the prediction with it; the solvers now run on one BLAS thread."""
    transformers = pytest.importorskip("transformers")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    lpes = []
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            lpes.append(build_graph(model, lpe=8).lpe)
    assert torch.equal(lpes[0], lpes[1])


def test_the_one_thread_limit_reaches_scipys_own_blas():
    """scipy bundles its own OpenBLAS, loaded by its first import; the one-thread limit must be set after that
    import, or it misses that library: in a fresh process the sparse solver then ran on every core and the
    library's threads kept spinning on them into the NiNo step that followed (the 251K step's first call 0.24 s
    instead of 0.17 s). Checked in a fresh interpreter: every BLAS library loaded after the solve was already
    loaded when the limit was set."""
    import subprocess
    import sys

    pytest.importorskip("threadpoolctl")
    code = """
import numpy as np, threadpoolctl
import nino_fast.graph.lpe as L
blas = lambda: {i["filepath"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
limited, orig = [], L._one_blas_thread
def recording():
    limited.append(blas())
    return orig()
L._one_blas_thread = recording
n = L.DENSE_MAX_NODES + 500  # the sparse solver
src = np.arange(n - 1); dst = src + 1
L.compute_lpe(src, dst, n, 4)
assert limited and blas() <= limited[0], (sorted(blas()), limited)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
