"""The step over a graph kept as its layout, on a history read tensor by tensor (stream.nowcast_layout): bitwise
the streamed / in-memory step, for every architecture family, tiling and scaling method."""

from __future__ import annotations

import pytest
import torch

from nino_fast import NiNoModel, build_graph, stream
from nino_fast.graph import build_graph_layout
from nino_fast.history import MemoryHistory, NonFiniteHistory, TensorHistory

from golden import ckpt


def _history(n: int, seed: int, ctx: int = 5, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 1, generator=gen) * 0.02 + torch.randn(n, ctx, generator=gen).cumsum(1) * 2e-4
    return h.to(dtype)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _convnet():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 5),
    )


def _transformer(arch: str):
    from nino_fast.testing import tiny_transformer

    return tiny_transformer(arch)


MODELS = {
    "mlp": _mlp,
    "convnet": _convnet,
    "gpt2": lambda: _transformer("gpt2"),
    "llama": lambda: _transformer("llama"),
}


@pytest.fixture(scope="module")
def nino():
    return NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("tile_edges", [None, 1, 777])
def test_layout_step_equals_streamed(nino, name, tile_edges):
    if name in ("gpt2", "llama"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = MODELS[name]()
    graph = build_graph(model, lpe=nino.lpe)
    layout = build_graph_layout(model, lpe=nino.lpe)
    assert (layout.num_nodes, layout.num_edges, layout.num_params) == (
        graph.num_nodes,
        graph.num_edges,
        graph.num_params,
    )
    states = _history(graph.num_params, seed=1)
    expected = nino.nowcast(graph, states, 7)
    got = stream.nowcast_layout(nino, layout, MemoryHistory(states, layout.param_shapes), 7, tile_edges=tile_edges)
    assert got.dtype == states.dtype and not got.requires_grad  # no autograd graph kept over the tiles
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["std", "min-max", "std-param", "min-max-param"])
def test_layout_step_every_scaling(nino, method):
    torch.manual_seed(0)
    model = _convnet()
    graph, layout = build_graph(model, lpe=nino.lpe), build_graph_layout(model, lpe=nino.lpe)
    states = _history(graph.num_params, seed=2)
    nino.scale_method = method
    try:
        expected = nino.nowcast(graph, states, 3)
        got = stream.nowcast_layout(nino, layout, MemoryHistory(states, layout.param_shapes), 3, tile_edges=50)
    finally:
        nino.scale_method = "std"
    assert torch.equal(got, expected)


def test_layout_step_bf16_history(nino):
    """A bfloat16 history (snapshots as saved by bf16 training) gives the in-memory step's bits, in bfloat16."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _transformer("llama")
    graph, layout = build_graph(model, lpe=nino.lpe), build_graph_layout(model, lpe=nino.lpe)
    states = _history(graph.num_params, seed=3, dtype=torch.bfloat16)
    expected = nino.nowcast(graph, states, 5)
    got = stream.nowcast_layout(nino, layout, MemoryHistory(states, layout.param_shapes), 5, tile_edges=300)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


class _Counting(TensorHistory):
    """Counts reads per tensor: the history is read about once per pass, not once per tile."""

    def __init__(self, states, param_shapes):
        super().__init__(param_shapes, states.shape[1], states.dtype)
        self.states, self.reads = states, [0] * len(param_shapes)

    def read(self, t, dtype=None):
        self.reads[t] += 1
        return self.states[self.offsets[t] : self.offsets[t + 1]].to(dtype or self.dtype, copy=True)


def test_layout_step_reads_each_tensor_about_once_per_pass(nino):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _transformer("gpt2")
    graph, layout = build_graph(model, lpe=nino.lpe), build_graph_layout(model, lpe=nino.lpe)
    states = _history(graph.num_params, seed=4)
    hist = _Counting(states, layout.param_shapes)
    got = stream.nowcast_layout(nino, layout, hist, 4, tile_edges=200)
    assert torch.equal(got, nino.nowcast(graph, states, 4))
    # 1 read for the statistics + at most a few per pass (a tensor whose rows are needed again later)
    assert max(hist.reads) <= 1 + 3 * 3, hist.reads
    assert sum(hist.reads) <= 1.5 * (1 + 3) * len(hist.reads), hist.reads


def test_layout_step_refuses_bad_history(nino):
    model = _mlp()
    layout = build_graph_layout(model, lpe=nino.lpe)
    states = _history(layout.num_params, seed=5)
    states[3, 2] = float("nan")
    with pytest.raises(NonFiniteHistory, match="0.weight"):
        stream.nowcast_layout(nino, layout, MemoryHistory(states, layout.param_shapes), 2)
    other = build_graph_layout(_convnet(), lpe=nino.lpe)
    with pytest.raises(ValueError, match="not the graph's"):
        stream.nowcast_layout(nino, other, MemoryHistory(states, layout.param_shapes), 2)
    with pytest.raises(ValueError, match="k"):
        stream.nowcast_layout(nino, layout, MemoryHistory(states.nan_to_num(), layout.param_shapes), 0)
    with pytest.raises(ValueError, match="ctx"):
        stream.nowcast_layout(nino, layout, MemoryHistory(states[:, :3].nan_to_num(), layout.param_shapes), 2)
    with pytest.raises(ValueError, match="lpe"):
        stream.nowcast_layout(nino, build_graph_layout(model, lpe=0), MemoryHistory(states, layout.param_shapes), 2)
    with pytest.raises(ValueError, match="too small"):
        stream.nowcast_layout(nino, layout, MemoryHistory(states.nan_to_num(), layout.param_shapes), 2, max_memory=10)


def test_nowcast_on_a_layout(nino):
    """NiNoModel.nowcast takes a GraphLayout with a tensor (any float dtype) or a TensorHistory: the same bits as
    on the built graph; the official approximations and bad states are refused."""
    pytest.importorskip("transformers")
    from nino_fast import build_graph_layout as public_layout

    torch.manual_seed(0)
    model = _transformer("llama")
    graph, layout = build_graph(model, lpe=nino.lpe), public_layout(model, lpe=nino.lpe)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for dtype in (torch.float32, torch.bfloat16):
        states = _history(graph.num_params, seed=6, dtype=dtype)
        expected = nino.nowcast(graph, states, 6)
        assert torch.equal(nino.nowcast(layout, states, 6, named_shapes=named), expected)
        assert torch.equal(nino.nowcast(layout, MemoryHistory(states, layout.param_shapes), 6), expected)
    for bad in (dict(fused=False), dict(edge_sample_ratio=0.5), dict(subgraph=True)):
        with pytest.raises(ValueError, match="exact folded step"):
            nino.nowcast(layout, states, 6, **bad)
    with pytest.raises(ValueError, match="shape"):
        nino.nowcast(layout, states[:-1], 6)
    with pytest.raises(TypeError, match="TensorHistory"):
        nino.nowcast(layout, states.tolist(), 6)
    with pytest.raises(ValueError, match="another model"):
        nino.nowcast(layout, states, 6, named_shapes=named[:-1])
    nan = states.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nino.nowcast(layout, nan, 6)


@pytest.mark.parametrize("snapshot_dtype", [torch.float32, torch.bfloat16])
def test_wrapper_with_a_layout_steps_as_with_the_built_graph(nino, snapshot_dtype, monkeypatch, caplog):
    """NiNo(graph=build_graph_layout(model)) reads its snapshot buffer one tensor at a time: after a NiNo step the
    parameters are bitwise those of the wrapper on the built graph; the layout is chosen by itself when the built
    graph and history would not fit in half the available memory."""
    pytest.importorskip("transformers")
    import logging

    from nino_fast import NiNo
    from nino_fast.optim import wrapper

    def train(graph=None):
        torch.manual_seed(0)
        model = _transformer("llama")
        opt = NiNo(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            model=model,
            ckpt=nino,
            period=5,
            snapshot_dtype=snapshot_dtype,
            graph=graph(model) if graph else None,
            on_error="raise",
        )
        x = torch.randint(0, 50, (2, 8))
        for _ in range(5):
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
        assert opt.last_nino_step["ok"]
        return opt, torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    _, expected = train()
    opt, got = train(lambda m: build_graph_layout(m, lpe=nino.lpe))
    assert isinstance(opt.graph, type(build_graph_layout(_mlp())))
    assert torch.equal(got, expected)
    monkeypatch.setattr(wrapper, "available_memory", lambda device: 1000)
    with caplog.at_level(logging.INFO, logger="nino_fast"):
        opt, got = train()
    assert "kept as its layout" in caplog.text
    assert torch.equal(got, expected)
