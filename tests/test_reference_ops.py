"""The reference ops equal the official formulation (concatenate, per-edge Linear, scatter-mean), on random CSR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nino_fast.ops import reference as ref


def random_csr(n_nodes, n_edges, heavy=None, gen=None):
    dst = torch.randint(0, max(n_nodes, 1), (n_edges,), generator=gen) if n_nodes else torch.zeros(0, dtype=torch.long)
    if heavy is not None and n_edges:
        dst[: n_edges // 2] = heavy
    dst = dst.sort().values
    src = torch.randint(0, max(n_nodes, 1), (n_edges,), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n_nodes).cumsum(0)
    return rowptr, src, dst


@pytest.mark.parametrize(
    "n_nodes, n_edges, d, c, heavy",
    [(0, 0, 4, 3, None), (5, 1, 3, 2, None), (20, 200, 8, 5, 3), (7, 3, 5, 9, None)],
)
def test_film_matches_official_formulation(n_nodes, n_edges, d, c, heavy):
    gen = torch.Generator().manual_seed(n_edges)
    rowptr, src, dst = random_csr(n_nodes, n_edges, heavy, gen)
    x = torch.randn(n_nodes, d, dtype=torch.float64)
    e = torch.randn(n_edges, c, dtype=torch.float64)
    enc = torch.nn.Linear(c, 2 * d).double()
    pre = torch.nn.Linear(2 * d, d).double()
    # official: pre(cat[x_dst, x_src]) modulated by the edge encoder, mean over destinations
    scale, shift = enc(e).chunk(2, -1)
    msg = scale * pre(torch.cat((x[dst], x[src.long()]), -1)) + shift
    want = torch.zeros(n_nodes, d, dtype=torch.float64).index_add_(0, dst, msg)
    want = want / torch.bincount(dst, minlength=n_nodes).clamp_min(1).unsqueeze(1)
    node_dst = F.linear(x, pre.weight[:, :d], pre.bias)
    node_src = F.linear(x, pre.weight[:, d:])
    got = ref.film_mean(e, rowptr, src, node_dst, node_src, enc.weight, enc.bias)
    torch.testing.assert_close(got, want)


def test_edge_update_matches_official_formulation():
    gen = torch.Generator().manual_seed(0)
    rowptr, src, dst = random_csr(30, 400, 0, gen)
    d = 6
    x, e = torch.randn(30, d, dtype=torch.float64), torch.randn(400, d, dtype=torch.float64)
    lin_e, lin_s, lin_t, lin1 = (torch.nn.Linear(d, d).double() for _ in range(4))
    want = lin1(F.silu(lin_e(e) + lin_s(x)[src.long()] + lin_t(x)[dst]))
    got = ref.edge_mlp(
        e,
        src,
        dst,
        lin_e.weight,
        lin_e.bias + lin_s.bias + lin_t.bias,
        lin1.weight,
        lin1.bias,
        node_src=F.linear(x, lin_s.weight),
        node_dst=F.linear(x, lin_t.weight),
    )
    torch.testing.assert_close(got, want)


def test_segment_mean_empty_rows():
    rowptr = torch.tensor([0, 0, 2, 2, 3])
    vals = torch.tensor([[1.0], [3.0], [5.0]])
    assert ref.segment_mean(vals, rowptr).flatten().tolist() == [0.0, 2.0, 0.0, 5.0]
