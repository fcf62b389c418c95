"""The NiNo model: official outputs on every golden, checkpoint loading, bad input, embeddings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nino_fast import NiNoModel, build_graph
from nino_fast.ops import dispatch

from golden import CASES, ckpt, load


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = NiNoModel.from_checkpoint(path)
        return cache[path]

    return get


PATHS = [("folded", b) for b in dispatch.BACKENDS] + [("layerwise", "reference")]


@pytest.mark.parametrize("path, backend", PATHS, ids=[f"{p}-{b}" for p, b in PATHS])
@pytest.mark.parametrize("case", CASES)
def test_golden_nowcast(case, path, backend, models):
    """Every golden through the folded plan on every available backend, and the layer-by-layer path."""
    if backend in ("cuda", "triton") and not torch.cuda.is_available():
        pytest.skip("GPU backend without a GPU")
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
    model = models(g["ckpt_path"])
    states = torch.from_numpy(g["states"])
    before = states.clone()
    dev = "cuda" if backend in ("cuda", "triton") else "cpu"
    out = model.to(dev).nowcast(graph, states, int(g["k"]), backend=backend, fused=path == "folded")
    model.cpu()
    expected = torch.from_numpy(g["expected"])
    assert out.shape == expected.shape and out.dtype == torch.float32
    err = (out - expected).abs().max() / expected.abs().max()
    assert err <= 1e-5, f"{case}: relative error {err:.2e}"
    assert torch.equal(states, before)  # the input history is not modified


@pytest.mark.parametrize("case", ["llama", "convnet"])
def test_other_horizons_change_output(case, models):
    """k picks a different head row: outputs differ across k, and k=1 moves less than k=40 on average."""
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
    model = models(g["ckpt_path"])
    states = torch.from_numpy(g["states"])
    outs = {k: model.nowcast(graph, states, k) for k in (1, 7, 40)}
    assert not torch.equal(outs[1], outs[7])
    step = {k: (o - states[:, -1]).abs().mean() for k, o in outs.items()}
    assert step[1] < step[40]


def test_checkpoint_args_honoured():
    m = NiNoModel.from_checkpoint(ckpt("nino_mlp_h32.pt"))
    assert m.is_mlp and m.hid == 32
    m = NiNoModel.from_checkpoint(ckpt("nino_posw_rand_v64.pt"))
    assert m.wte_pos_enc and m.vocab_size == 64 and m.lpe == 8
    m = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
    assert not m.wte_pos_enc and len(m.gnn.convs) == 3 and len(m.gnn.edge_update) == 2
    assert m.train_info is None  # official checkpoints carry no nino-fast training record


def test_checkpoint_load_is_light_and_owns_its_weights():
    """Loading builds no randomly initialised model and imports neither torch._dynamo nor sympy (1-2 s in a fresh
    process, paid by every first NiNo step); the weights are float32 CPU copies, never the caller's tensors."""
    code = (
        "import sys; from nino_fast import NiNoModel; "
        f"NiNoModel.from_checkpoint({str(ckpt('nino_no_posw.pt'))!r}); "
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    sd = torch.load(ckpt("nino_no_posw.pt"), weights_only=True)
    half = dict(sd, state_dict={k: v.half() for k, v in sd["state_dict"].items()})
    m = NiNoModel.from_checkpoint(half)
    w = m.edge_proj.fc[0].weight
    assert w.dtype == torch.float32 and w.requires_grad and w.is_contiguous()
    assert torch.equal(w, half["state_dict"]["edge_proj.fc.0.weight"].float())
    with torch.no_grad():
        w.zero_()
    assert half["state_dict"]["edge_proj.fc.0.weight"].abs().sum() > 0  # the caller's dict is untouched


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        NiNoModel.from_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        NiNoModel.from_checkpoint(junk)
    sd = torch.load(ckpt("nino_no_posw.pt"), weights_only=True)
    broken = dict(sd, state_dict={k: v for k, v in sd["state_dict"].items() if k != "gnn.convs.1.lin.bias"})
    with pytest.raises(ValueError, match="missing key 'gnn.convs.1.lin.bias'"):
        NiNoModel.from_checkpoint(broken)
    wrong = dict(sd, state_dict=dict(sd["state_dict"], **{"edge_proj.fc.0.weight": torch.zeros(128, 40)}))
    with pytest.raises(ValueError, match="'edge_proj.fc.0.weight' has shape"):
        NiNoModel.from_checkpoint(wrong)
    extra = dict(sd, state_dict=dict(sd["state_dict"], foo=torch.zeros(1)))
    with pytest.raises(ValueError, match="unexpected key 'foo'"):
        NiNoModel.from_checkpoint(extra)
    with pytest.raises(ValueError, match="unknown model_args"):
        NiNoModel.from_checkpoint(dict(sd, model_args={"wte_pos_enc": False, "hidden": 3}))
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="must map names to tensors"):
        NiNoModel.from_checkpoint(tmp_path / "other.pt")
    with pytest.raises(IsADirectoryError, match="a directory, not a checkpoint file"):
        NiNoModel.from_checkpoint(tmp_path)


def test_bare_state_dict_says_its_own_args():
    """A bare state_dict (no model_args) of nino_no_posw.pt has no wte_pos_enc weights: loaded without it."""
    sd = torch.load(ckpt("nino_no_posw.pt"), weights_only=True)
    bare = NiNoModel.from_checkpoint(sd["state_dict"])
    assert not bare.wte_pos_enc
    full = NiNoModel.from_checkpoint(sd)
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(), full.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def llama_case(models):
    g = load("llama")
    graph = build_graph(g["named"], arch="llama", lpe=g["lpe_t"], **g["kwargs"])
    return models(g["ckpt_path"]), graph, torch.from_numpy(g["states"])


@pytest.mark.parametrize(
    "mutate, k, match",
    [
        (lambda s: s, 0, r"k must be an int in 1\.\.40, got 0"),
        (lambda s: s, 41, r"1\.\.40, got 41"),
        (lambda s: s, 2.0, "k must be an int"),
        (lambda s: s[:-1], 1, r"expected \(n_params=3516, ctx=5\)"),
        (lambda s: s[:, :4], 1, r"ctx=5"),
        (lambda s: s.flatten(), 1, r"\(n_params, ctx\) tensor"),
        (lambda s: s.index_fill(0, torch.tensor([3]), float("nan")), 1, "contain 5 NaN/Inf"),
        (lambda s: s.index_fill(0, torch.tensor([3, 9]), float("inf")), 1, "contain 10 NaN/Inf"),
        (lambda s: s.long(), 1, "floating point"),
    ],
)
def test_bad_inputs(llama_case, mutate, k, match):
    model, graph, states = llama_case
    with pytest.raises(ValueError, match=match):
        model.nowcast(graph, mutate(states.clone()), k)


@pytest.mark.parametrize("max_memory", [None, "4MB"])
def test_states_layout_does_not_change_the_bits(llama_case, max_memory):
    """The same values in another memory layout (column-major, a strided view) give the same bits: torch's
    reductions order their sums by the layout, so the step reads a contiguous history."""
    model, graph, states = llama_case
    want = model.nowcast(graph, states, 7, max_memory=max_memory)
    for other in (states.t().contiguous().t(), torch.stack([states, states], 2)[:, :, 0]):
        assert torch.equal(other, states) and not other.is_contiguous()
        assert torch.equal(model.nowcast(graph, other, 7, max_memory=max_memory), want)


def test_graph_model_mismatch(llama_case):
    model, graph, states = llama_case
    no_lpe = build_graph(load("llama")["named"], arch="llama", num_heads=6, num_key_value_heads=2, lpe=0)
    with pytest.raises(ValueError, match="needs graph.lpe"):
        model.nowcast(no_lpe, states, 1)
    conv = load("convnet")
    small = NiNoModel(max_feat_size=4, wte_pos_enc=False)
    cgraph = build_graph(conv["named"], lpe=8)
    with pytest.raises(ValueError, match="at most 4"):
        small.nowcast(cgraph, torch.zeros(cgraph.num_params, 5), 1)


def test_nonfinite_prediction_raises(llama_case):
    model, graph, states = llama_case
    broken = NiNoModel.from_checkpoint({"state_dict": model.state_dict(), "model_args": {"wte_pos_enc": False}})
    with torch.no_grad():
        broken.edge_out.fc[2].bias.fill_(float("inf"))
    with pytest.raises(ValueError, match="prediction has"):
        broken.nowcast(graph, states, 1)


def test_embed(llama_case):
    model, graph, states = llama_case
    x, e = model.embed(graph, states)
    assert x.shape == (graph.num_nodes, 128) and e.shape == (graph.num_edges, 128)
    px, pe = model.embed(graph, states, pooled=True)
    assert torch.allclose(px, x.mean(0)) and torch.allclose(pe, e.mean(0))
    assert torch.isfinite(x).all() and torch.isfinite(e).all()
    with pytest.raises(ValueError, match="no graph embeddings"):
        NiNoModel.from_checkpoint(ckpt("nino_mlp.pt")).embed(graph, states)


def test_scale_methods_roundtrip():
    from nino_fast.scaling import scale_params, unscale_params

    shapes = [("a", (3, 4)), ("b", (5,)), ("c", (2, 2))]
    states = torch.randn(21, 5) * 3 + 1
    for method in ("std", "std-param", "min-max", "min-max-param"):
        scaled, scales = scale_params(states, shapes, method)
        back = unscale_params(scaled[:, -1], shapes, scales, method)
        assert torch.allclose(back, states[:, -1], atol=1e-4), method
    scaled, _ = scale_params(states, shapes, "std")
    assert torch.allclose(scaled[:12].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(scaled[:12].std(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError, match="scale method"):
        scale_params(states, shapes, "l2")
