"""nino_fast.nn layers against a plain MessagePassing-equivalent written here in PyTorch (float64): outputs and
every gradient (x, edge_attr, each weight) on random graphs in any edge order (empty rows, one edge, a hub row,
self loops, duplicate edges), on every CPU backend; a small PyG-style model trains; torch.compile(fullgraph=True)
over it; bad inputs raise clear errors. (Against torch_geometric itself where it is installed.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nino_fast.nn import CSRGraph, EdgeFiLMConv, EdgeUpdate, EdgeUpdateFiLMConv
from nino_fast.ops import dispatch
from nino_fast.testing import assert_close_scaled

BACKENDS = dispatch.available_backends("cpu")


# ---------------------------------------------------------------- the maths, as a plain message-passing layer
def ref_mean(msg, dst, n):
    out = torch.zeros(n, msg.shape[1], dtype=msg.dtype).index_add_(0, dst, msg)
    return out / torch.bincount(dst, minlength=n).clamp_min(1).unsqueeze(1).to(msg.dtype)


def ref_conv(conv, x, edge_index, edge_attr):
    src, dst = edge_index
    scale, shift = conv.lin_edge(edge_attr).chunk(2, -1)
    return ref_mean(scale * conv.lin(torch.cat((x[dst], x[src]), -1)) + shift, dst, x.shape[0])


def ref_update(up, x, edge_index, edge_attr):
    src, dst = edge_index
    return up.lin_out(F.silu(up.lin_edge(edge_attr) + up.lin_src(x[src]) + up.lin_dst(x[dst])))


def graph(kind: str, n: int = 12, e: int = 40, seed: int = 0) -> torch.Tensor:
    """(2, E) int64 edge_index in random order."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "one edge":
        return torch.tensor([[3], [5]])
    ei = torch.randint(0, n, (2, e), generator=gen)
    if kind == "empty rows":
        ei[1] = ei[1] % (n // 3)  # only the first third of the nodes receive
    elif kind == "hub":
        ei = torch.cat((ei, torch.stack((torch.randint(0, n, (500,), generator=gen), torch.full((500,), 7)))), 1)
    elif kind == "self loops + duplicates":
        loops = torch.arange(n).repeat(2, 1)
        ei = torch.cat((ei, loops, ei[:, :10], ei[:, :10]), 1)
    return ei[:, torch.randperm(ei.shape[1], generator=gen)]


GRAPHS = ["random", "one edge", "empty rows", "hub", "self loops + duplicates"]


def _compare(module, ref_fn, x, edge_index, edge_attr, backend, x_conv=None):
    """Output and all gradients of ``module`` (float32, fused) vs ``ref_fn`` on a float64 copy."""
    ref_module = copy.deepcopy(module).double()
    xs = [t.detach().clone().requires_grad_() for t in (x, edge_attr) + ((x_conv,) if x_conv is not None else ())]
    x64 = [t.detach().double().requires_grad_() for t in xs]
    with dispatch.use_backend(backend):
        out = module(xs[0], edge_index, xs[1], *xs[2:])
    want = ref_fn(ref_module, x64[0], edge_index, x64[1], *x64[2:])
    assert_close_scaled(out, want)
    gout = torch.randn(out.shape, dtype=torch.float64)
    params = list(module.parameters())
    got = torch.autograd.grad(out, xs + params, gout.float(), allow_unused=True)
    exp = torch.autograd.grad(want, x64 + list(ref_module.parameters()), gout, allow_unused=True)
    names = ["x", "edge_attr", "x_conv"][: len(xs)] + [n for n, _ in module.named_parameters()]
    for name, g, w, p in zip(names, got, exp, xs + params, strict=True):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p, dtype=torch.float64) if w is None else w
        assert_close_scaled(g, w, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", GRAPHS)
def test_edge_film_conv(backend, kind):
    ei = graph(kind)
    conv = EdgeFiLMConv(6, 8, 5)
    _compare(conv, ref_conv, torch.randn(12, 6), ei, torch.randn(ei.shape[1], 5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", GRAPHS)
def test_edge_update(backend, kind):
    ei = graph(kind)
    up = EdgeUpdate(6, 5, 7, hidden_channels=9)
    _compare(up, ref_update, torch.randn(12, 6), ei, torch.randn(ei.shape[1], 5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", GRAPHS)
def test_fused_update_conv(backend, kind):
    """EdgeUpdateFiLMConv = EdgeFiLMConv after EdgeUpdate (values and every gradient)."""
    ei = graph(kind)
    fused = EdgeUpdateFiLMConv(EdgeUpdate(6, 5, 4, hidden_channels=9), EdgeFiLMConv(3, 8, 4))

    def ref(m, x, edge_index, edge_attr, x_conv):
        return ref_conv(m.conv, x_conv, edge_index, ref_update(m.update, x, edge_index, edge_attr))

    _compare(fused, ref, torch.randn(12, 6), ei, torch.randn(ei.shape[1], 5), backend, x_conv=torch.randn(12, 3))


def test_csr_input_and_cache():
    """A CSRGraph gives the same result; the CSR of an edge_index is built once and rebuilt after an in-place edit."""
    from nino_fast.nn import graph as g

    ei = graph("random")
    conv, x, ea = EdgeFiLMConv(6, 8, 5), torch.randn(12, 6), torch.randn(40, 5)
    csr = CSRGraph.from_edge_index(ei, 12)
    torch.testing.assert_close(conv(x, csr, ea), conv(x, ei, ea))
    assert g.csr_of(ei, 12, "t") is g.csr_of(ei, 12, "t")
    first = g.csr_of(ei, 12, "t")
    ei[1, 0] = (ei[1, 0] + 1) % 12
    assert g.csr_of(ei, 12, "t") is not first
    up = EdgeUpdate(6, 5, 7)
    torch.testing.assert_close(up(x, CSRGraph.from_edge_index(ei, 12), ea), up(x, ei, ea))


def test_cache_never_stale():
    """Writes the version counter does not see (numpy, ``.data``) still rebuild the CSR: results always equal those
    of a fresh tensor of the same values; the same values keep the cached CSR."""
    from nino_fast.nn import graph as g

    np = pytest.importorskip("numpy")
    conv, up = EdgeFiLMConv(6, 8, 5), EdgeUpdate(6, 5, 7)
    x, ea = torch.randn(12, 6), torch.randn(40, 5)
    buf = graph("random").numpy().copy()
    ei = torch.from_numpy(buf)
    first = g.csr_of(ei, 12, "t")
    assert g.csr_of(ei, 12, "t") is first
    conv(x, ei, ea), up(x, ei, ea)
    buf[1] = np.roll(buf[1], 1)  # through numpy
    for layer in (conv, up):
        torch.testing.assert_close(layer(x, ei, ea), layer(x, ei.clone(), ea), rtol=0, atol=0)
    ei.data[0, :5] = 0  # through .data
    torch.testing.assert_close(conv(x, ei, ea), conv(x, ei.clone(), ea), rtol=0, atol=0)


def test_cache_inference_mode_and_release():
    """Under torch.inference_mode (inference tensors have no version counter) the layers run; a freed edge_index
    takes its cached CSR with it."""
    import gc

    from nino_fast.nn import graph as g

    conv, x, ea = EdgeFiLMConv(6, 8, 5), torch.randn(12, 6), torch.randn(40, 5)
    want = conv(x, graph("random"), ea)
    with torch.inference_mode():
        ei = graph("random")
        torch.testing.assert_close(conv(x, ei, ea), want)
    ei = graph("random")
    conv(x, ei, ea)
    key = (id(ei), 12, ei.device)
    assert key in g._CACHE
    del ei
    gc.collect()
    assert key not in g._CACHE


@pytest.mark.parametrize("make", ["bf16", "float64"])
def test_dtypes(make):
    """A float64 layer computes in float64 (gradcheck holds: the ops run their exact spec); a bf16 layer on the CPU
    is computed by the float32 kernels from its bf16 inputs and returns bf16, so bf16 layers stack."""
    torch.manual_seed(0)
    ei = graph("self loops + duplicates")
    if make == "float64":
        up = EdgeUpdate(3, 2, 3).double()
        fused = EdgeUpdateFiLMConv(up, EdgeFiLMConv(3, 2, 3).double())
        x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
        ea = torch.randn(ei.shape[1], 2, dtype=torch.float64, requires_grad=True)
        for layer in (fused.conv, up, fused):
            inputs = (x, ei, ea if layer is not fused.conv else torch.randn(ei.shape[1], 3, dtype=torch.float64))
            assert layer(*inputs).dtype == torch.float64
            assert torch.autograd.gradcheck(
                lambda x, e, layer=layer: layer(x, ei, e), (inputs[0], inputs[2].requires_grad_())
            )
        return
    conv = EdgeFiLMConv(6, 8, 5)
    x, ea = torch.randn(12, 6), torch.randn(ei.shape[1], 5)
    half = copy.deepcopy(conv).bfloat16()
    got = half(x.bfloat16(), ei, ea.bfloat16())
    assert got.dtype == torch.bfloat16  # as torch's layers: a stack of bf16 layers runs
    want = copy.deepcopy(half).float()(x.bfloat16().float(), ei, ea.bfloat16().float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)  # node terms are computed in bf16 by F.linear
    up = EdgeUpdate(8, 5, 5).bfloat16()
    stacked = EdgeUpdateFiLMConv(up, EdgeFiLMConv(8, 4, 5).bfloat16())(got, ei, up(got, ei, ea.bfloat16()))
    assert stacked.dtype == torch.bfloat16 and torch.isfinite(stacked).all()
    with pytest.raises(TypeError, match=r"EdgeFiLMConv: the inputs are torch.float64 but the layer's parameters are "):
        conv(x.double(), ei, ea.double())


def test_pyg_style_model_trains():
    torch.manual_seed(0)
    n, ei = 30, graph("random", n=30, e=120)
    x, ea, y = torch.randn(n, 8), torch.randn(ei.shape[1], 4), torch.randn(n, 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.up, self.conv2 = EdgeFiLMConv(8, 16, 4), EdgeUpdate(16, 4, 4), EdgeFiLMConv(16, 1, 4)

        def forward(self, x, edge_index, edge_attr):
            h = F.relu(self.conv1(x, edge_index, edge_attr))
            return self.conv2(h, edge_index, self.up(h, edge_index, edge_attr))

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x, ei, ea), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) over a model of the layers (edge_index sorted inside the graph, or a CSRGraph
    built outside): no graph break, same output and gradients as eager."""
    ei = graph("self loops + duplicates")
    model = torch.nn.ModuleList([EdgeFiLMConv(6, 8, 5), EdgeUpdate(8, 5, 5), EdgeFiLMConv(8, 4, 5)])
    fused = EdgeUpdateFiLMConv(model[1], model[2])

    def fn(x, edge_index, edge_attr):
        h = model[0](x, edge_index, edge_attr)
        return model[2](h, edge_index, model[1](h, edge_index, edge_attr)) + fused(h, edge_index, edge_attr)

    x, ea = torch.randn(12, 6, requires_grad=True), torch.randn(ei.shape[1], 5, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for g in (ei, CSRGraph.from_edge_index(ei, 12)):
        want = fn(x, g, ea)
        got = compiled(x, g, ea)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        gw = torch.autograd.grad(want.sum(), [x, ea, model[1].lin_out.weight])
        gg = torch.autograd.grad(got.sum(), [x, ea, model[1].lin_out.weight])
        for a, b in zip(gg, gw, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    conv, x, ei = EdgeFiLMConv(6, 8, 5), torch.randn(12, 6), graph("random")
    ea = torch.randn(40, 5)
    with pytest.raises(ValueError, match=r"EdgeFiLMConv: x must have shape \(N, 6\), got \(12, 7\)"):
        conv(torch.randn(12, 7), ei, ea)
    with pytest.raises(ValueError, match=r"edge_attr must have shape \(E, 5\), got \(40, 4\)"):
        conv(x, ei, torch.randn(40, 4))
    with pytest.raises(ValueError, match=r"edge_attr must have one row per edge \(40\), got 39 rows"):
        conv(x, ei, ea[:39])
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        conv(x, ei[:1], ea)
    with pytest.raises(TypeError, match="edge_index must be int64 or int32, got torch.float32"):
        conv(x, ei.float(), ea)
    bad = ei.clone()
    bad[0, 3] = 12
    with pytest.raises(IndexError, match=r"edge_index entries must lie in \[0, 12\) \(num_nodes\), got \[0, 12\]"):
        conv(x, bad, ea)
    bad[0, 3] = -1
    with pytest.raises(IndexError, match="got \\[-1, "):
        EdgeUpdate(6, 5, 3)(x, bad, ea)
    with pytest.raises(TypeError, match="x and edge_attr must share one floating dtype"):
        conv(x.double(), ei, ea)
    with pytest.raises(ValueError, match=r"update.out_channels \(3\) must equal conv.edge_dim \(5\)"):
        EdgeUpdateFiLMConv(EdgeUpdate(6, 5, 3), conv)
    # edge_index is checked before anything is read from it
    with pytest.raises(
        ValueError, match=r"EdgeFiLMConv: edge_index must have shape \(2, E\) \[src; dst\], got \(40, 2\)"
    ):
        conv(x, ei.t().contiguous(), ea)
    with pytest.raises(TypeError, match="EdgeFiLMConv: edge_index must be a \\(2, E\\) tensor or a CSRGraph, got list"):
        conv(x, ei.tolist(), ea)
    sparse = torch.sparse_coo_tensor(ei.flip(0), torch.ones(40), (12, 12), check_invariants=True)
    with pytest.raises(TypeError, match="edge_index must be a dense .* got layout torch.sparse_coo"):
        conv(x, sparse, ea)
    fused = EdgeUpdateFiLMConv(EdgeUpdate(6, 5, 5), conv)
    with pytest.raises(ValueError, match=r"EdgeUpdateFiLMConv: x_conv must have shape \(N, 6\), got \(12, 3\)"):
        fused(x, ei, ea, x_conv=torch.randn(12, 3))
    with pytest.raises(ValueError, match=r"x_conv must have one row per node of x \(12\), got 2"):
        fused(x, ei, ea, x_conv=torch.randn(2, 6))
    for bad_size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            EdgeUpdate(6, 5, 3, hidden_channels=bad_size)
        with pytest.raises(ValueError, match="must be an int >= 1"):
            EdgeFiLMConv(6, bad_size, 5)


def test_reset_parameters():
    fused = EdgeUpdateFiLMConv(EdgeUpdate(6, 5, 5), EdgeFiLMConv(6, 8, 5))
    before = [p.detach().clone() for p in fused.parameters()]
    fused.reset_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, fused.parameters(), strict=True))


def test_compile_empty_graph_and_edge_index_subclass():
    """torch.compile(fullgraph=True) with no edges (zeros, as eager), and with PyG's EdgeIndex where installed."""
    conv = EdgeFiLMConv(6, 8, 5)
    x = torch.randn(12, 6)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    empty = torch.empty(2, 0, dtype=torch.int64)
    torch.testing.assert_close(compiled(x, empty, torch.randn(0, 5)), torch.zeros(12, 8))
    pyg = pytest.importorskip("torch_geometric")
    ei = graph("random")
    ea = torch.randn(40, 5)
    edge_index = pyg.EdgeIndex(ei, sparse_size=(12, 12))
    torch.testing.assert_close(compiled(x, edge_index, ea), conv(x, ei, ea))
    torch.testing.assert_close(conv(x, edge_index, ea), conv(x, ei, ea))


def test_matches_torch_geometric():
    """Where torch_geometric is installed: the same maths as PyG MessagePassing layers gives the same values and
    gradients (x, edge_attr, every weight), on a hub graph and a random unsorted one."""
    pyg = pytest.importorskip("torch_geometric")

    class PygFiLM(pyg.nn.MessagePassing):
        def __init__(self, conv):
            super().__init__(aggr="mean")
            self.conv = conv

        def forward(self, x, edge_index, edge_attr):
            return self.propagate(edge_index, x=x, edge_attr=edge_attr)

        def message(self, x_i, x_j, edge_attr):
            scale, shift = self.conv.lin_edge(edge_attr).chunk(2, -1)
            return scale * self.conv.lin(torch.cat((x_i, x_j), -1)) + shift

    class PygUpdate(pyg.nn.MessagePassing):
        def __init__(self, up):
            super().__init__()
            self.up = up

        def forward(self, x, edge_index, edge_attr):
            return self.edge_updater(edge_index, x=x, edge_attr=edge_attr)

        def edge_update(self, x_i, x_j, edge_attr):
            up = self.up
            return up.lin_out(F.silu(up.lin_edge(edge_attr) + up.lin_src(x_j) + up.lin_dst(x_i)))

    def grads(layer, pyg_layer, x, ei, ea):
        """Values and the gradients of x, edge_attr and every weight for one upstream gradient."""
        out = {}
        for name, run in (("ours", layer), ("pyg", pyg_layer)):
            layer.zero_grad()
            xg, eg = x.clone().requires_grad_(), ea.clone().requires_grad_()
            y = run(xg, ei, eg)
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            out[name] = [y.detach(), xg.grad, eg.grad] + [p.grad.clone() for p in layer.parameters()]
        return out["ours"], out["pyg"]

    for kind in ("hub", "random"):
        ei = graph(kind)
        n = int(ei.max()) + 1
        x, ea = torch.randn(n, 6), torch.randn(ei.shape[1], 5)
        for layer, wrap in ((EdgeFiLMConv(6, 8, 5), PygFiLM), (EdgeUpdate(6, 5, 4), PygUpdate)):
            ours, ref = grads(layer, wrap(layer), x, ei, ea)
            for a, b in zip(ours, ref, strict=True):  # 1e-5 of each tensor's scale: float32 sums of 500 edges
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    # PyG's EdgeIndex (a Tensor subclass) is an edge_index like any other
    edge_index = pyg.EdgeIndex(ei, sparse_size=(n, n))
    conv = EdgeFiLMConv(6, 8, 5)
    torch.testing.assert_close(conv(x, edge_index, ea), conv(x, ei, ea), rtol=0, atol=0)
