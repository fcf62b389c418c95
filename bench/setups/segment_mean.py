"""``segment_mean``: the mean of each CSR row of an (E, D) tensor (``torch.ops.nino_fast.segment_mean_csr``).

Ours: the extension's kernel (cpu or cuda); reference: ``index_add_`` and a division; pyg:
``torch_geometric.utils.scatter(reduce='mean')``. No GEMM: FLOPs count the E x D additions, so the table's
"% of FMA peak" is not meaningful for this op; it is bound by reading the E x D values once.
"""

from __future__ import annotations

import torch

from . import Case, Setup, Unsupported, graph, randn

OPS = ("segment_mean",)


def setup(case: Case, backend: str) -> Setup:
    from nino_fast.ops import segment_mean_csr_reference

    g = graph(case)
    values = randn(case, case.edges, case.dim, salt=2)
    if backend == "pyg":
        from torch_geometric.utils import scatter

        index = g.dst.long()
        call = lambda: scatter(values, index, 0, dim_size=g.nodes, reduce="mean")
    elif backend == "reference":
        call = lambda: segment_mean_csr_reference(values, g.rowptr)
    elif backend == "compiled":
        fn = torch.compile(segment_mean_csr_reference)
        call = lambda: fn(values, g.rowptr)
    elif backend in ("cpu", "cuda") and backend == torch.device(case.device).type:
        call = lambda: torch.ops.nino_fast.segment_mean_csr(values, g.rowptr)
    else:
        raise Unsupported(f"segment_mean has no {backend} implementation on {case.device}")
    return Setup(torch.no_grad()(call), case.edges * case.dim, values.nbytes)
