"""torch.compile over our ops (every backend): no graph break (fullgraph=True), same results as eager."""

from __future__ import annotations

import pytest
import torch

from nino_fast.ops import dispatch
from nino_fast.testing import device_of, make_inputs


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_fullgraph_compile(backend):
    torch._dynamo.reset()
    dev = device_of(backend) if backend != "reference" else "cpu"
    inp = {k: v.to(dev) for k, v in make_inputs(20, 150, 5, 16, seed=7).items()}

    def step(a):
        agg0 = dispatch.film_mean(
            a["feat"],
            a["rowptr"],
            a["src"],
            a["nd"],
            a["ns"],
            a["W2"],
            a["b2"],
            a["etype"],
            a["table2"],
            backend=backend,
        )
        agg1 = dispatch.edge_film_mean(
            a["feat"],
            a["rowptr"],
            a["src"],
            a["Wa"],
            a["ba"],
            a["etype"],
            a["table"],
            a["ns"],
            a["nd"],
            a["md"] + agg0,
            a["ms"],
            a["Wsc"],
            a["bsc"],
            a["Wsh"],
            a["bsh"],
            backend=backend,
        )
        out = dispatch.edge_mlp(
            a["feat"],
            a["src"],
            a["dst"],
            a["Wa"],
            a["ba"],
            a["Wb"],
            a["bb"],
            a["etype"],
            a["table"],
            a["ns"],
            a["nd"],
            agg1,
            a["nd2"],
            act_out=True,
            backend=backend,
        )
        return agg0, agg1, out

    # backend= names the implementation in effect (use_backend around the calls): inside a compiled region a
    # per-call choice must agree with it, since the switch is read when the graph runs
    with dispatch.use_backend(backend):
        eager = step(inp)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(inp)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_nowcast_core_compiles():
    """The folded plan's GNN core traces as one graph with the default backend's ops."""
    from nino_fast import NiNoModel, build_graph
    from nino_fast import plan as folded

    from golden import load

    torch._dynamo.reset()
    g = load("gpt2")
    graph = build_graph(g["named"], arch="gpt2", lpe=g["lpe_t"], **g["kwargs"])
    model = NiNoModel.from_checkpoint(g["ckpt_path"])
    raw = graph.to_edges(torch.randn(graph.num_params, 5))
    used = torch.arange(graph.num_edges)
    backend = dispatch.resolve("cpu")
    with torch.no_grad():
        fw = model._folded(raw.shape[1])  # folded outside the traced region (a parameter-version cache)
        eager = folded.predict_deltas(model, graph, raw, 10, used, fw, backend)
        fn = torch.compile(
            lambda r: folded.predict_deltas(model, graph, r, 10, used, fw, backend),
            fullgraph=True,
            backend="aot_eager",
        )
        torch.testing.assert_close(fn(raw), eager, rtol=1e-5, atol=1e-5)
