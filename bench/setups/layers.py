"""The public layers' training step: forward + backward of ``nino_fast.nn.EdgeFiLMConv`` (``train_film``),
``EdgeUpdate`` (``train_edge``) and ``EdgeUpdateFiLMConv`` (``train_fused``), in_channels = edge_dim =
out_channels = D, on a graph given as a shuffled (2, E) edge_index (PyG's convention).

The step: clear the gradients, forward, backward of a fixed random upstream gradient; it returns the output and
the gradients of x, edge_attr and every parameter (all checked against the reference before timing).
Backends: ours (the layer on cpu / cuda / triton), reference (the same layer on the reference ops) and pyg
(:func:`bench.pyg_ref.pyg_like`: the PyG ``MessagePassing`` version with the same weights). The layer's CSR of
edge_index is cached per edge_index tensor (built in the warm-up call, as in a training loop over one graph).
FLOPs: 3x the forward's minimal GEMM FLOPs (the backward: one GEMM for the input and one for the weight
gradient per forward GEMM).
"""

from __future__ import annotations

import contextlib

from . import Case, Setup, Unsupported, graph, randn, seeded

OPS = ("train_film", "train_edge", "train_fused")


def _build(op: str, d: int):
    from nino_fast.nn import EdgeFiLMConv, EdgeUpdate, EdgeUpdateFiLMConv

    return {
        "train_film": lambda: EdgeFiLMConv(d, d, d),
        "train_edge": lambda: EdgeUpdate(d, d, d),
        "train_fused": lambda: EdgeUpdateFiLMConv(EdgeUpdate(d, d, d), EdgeFiLMConv(d, d, d)),
    }[op]


def setup(case: Case, backend: str) -> Setup:
    from nino_fast.ops.dispatch import use_backend

    if backend == "compiled":
        raise Unsupported("the layers' training step has no compiled backend here")
    d, g = case.dim, graph(case, shuffled=True)
    x = randn(case, g.nodes, d, salt=1).requires_grad_()
    e = randn(case, case.edges, d, salt=2, scale=0.5).requires_grad_()
    model = seeded(case, _build(case.op, d))
    if backend == "pyg":
        from ..pyg_ref import pyg_like

        model, ctx = pyg_like(model), contextlib.nullcontext
    else:
        ctx = lambda: use_backend(backend)
    params = list(model.parameters())
    rows = case.edges if case.op == "train_edge" else g.nodes
    grad_out = randn(case, rows, d, salt=3)
    if grad_out.dtype != x.dtype or not grad_out.is_floating_point():
        raise Unsupported(f"dtype {case.dtype}")

    def step():
        for t in (x, e, *params):
            t.grad = None
        with ctx():
            out = model(x, g.edge_index, e)
            out.backward(grad_out.to(out.dtype))
        return [out.detach(), x.grad, e.grad, *(p.grad for p in params)]

    gemm = 2 * d * d
    forward = {"train_film": case.edges + 3 * g.nodes, "train_edge": 2 * case.edges + 2 * g.nodes}
    forward["train_fused"] = 2 * case.edges + 5 * g.nodes
    return Setup(step, 3 * gemm * forward[case.op], 2 * e.nbytes + 2 * g.edge_index.nbytes)
