"""Neural-graph construction: identical to the official graphs, CSR invariants, feature mapping, bad input."""

from __future__ import annotations

import collections
import logging

import pytest
import torch

from nino_fast import build_graph
from nino_fast.graph import detect_arch

from golden import CASES, load

GRAPH_CASES = [c for c in CASES if c not in ("mlp_wnn", "gpt2_posw")]  # same graphs as mlp / gpt2


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_golden_graph_identical(case):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    ref = g["edge_index"]
    assert graph.num_nodes == int(ref.max()) + 1
    ei = graph.edge_index()
    mine = collections.Counter(zip(ei[0].tolist(), ei[1].tolist(), graph.edge_type.tolist(), strict=True))
    theirs = collections.Counter(zip(ref[0].tolist(), ref[1].tolist(), g["edge_type"].tolist(), strict=True))
    assert mine == theirs
    assert torch.equal(graph.pos_w, torch.from_numpy(g["pos_w"]))


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_csr_invariants_and_roundtrip(case):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    rp, dst = graph.rowptr, graph.dst.long()
    assert rp[0] == 0 and rp[-1] == graph.num_edges and bool((rp[1:] >= rp[:-1]).all())
    assert bool((dst[1:] >= dst[:-1]).all())
    assert torch.equal(torch.repeat_interleave(torch.arange(graph.num_nodes), graph.degree()), dst)
    assert graph.src.dtype == torch.int32 and graph.rowptr.dtype == torch.int64
    # every parameter owns exactly one (edge, slot); to_vector inverts to_edges
    assert graph.param_pos.unique().numel() == graph.num_params
    states = torch.randn(graph.num_params, 5)
    feats = graph.to_edges(states)
    assert feats.shape == (graph.num_edges, graph.max_feat_size * 5)
    for c in range(5):
        per_slot = feats.view(graph.num_edges, graph.max_feat_size, 5)[:, :, c]
        assert torch.equal(graph.to_vector(per_slot), states[:, c])
    # structural edges: self-loops carry 2, residual/head edges 1, in slot 0 of every context step
    loops = graph.edge_type == 13
    assert loops.sum() == graph.num_nodes
    assert bool((feats.view(graph.num_edges, -1, 5)[loops, 0] == 2).all())
    assert torch.equal(graph.src[loops], graph.dst[loops])


def test_to_moves_tensors_and_keeps_every_other_field():
    g = load("convnet")
    graph = build_graph(g["named"], arch=g["arch"], lpe=4, **g["kwargs"])
    assert graph.to("cpu") is graph and graph.to(torch.device("cpu")) is graph  # already there: no copy
    moved = graph.to("meta")
    for name, value in vars(graph).items():
        if isinstance(value, torch.Tensor):
            got = getattr(moved, name)
            assert got.device.type == "meta" and got.shape == value.shape and got.dtype == value.dtype, name
        else:
            assert getattr(moved, name) is value, name  # fingerprint, param_shapes, meta, blocks, ...
    assert graph.rowptr.device.type == "cpu"  # the original is untouched


def test_feature_slots_follow_conv_kernels():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Conv2d(3, 4, 1), torch.nn.Linear(4, 2))
    graph = build_graph(net, lpe=0)
    assert graph.max_feat_size == 9
    states = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).unsqueeze(1)
    feats = graph.to_edges(states).view(graph.num_edges, 9)
    w = net[0].weight.detach()  # edge (in i -> out o) of the first conv holds its 3x3 kernel in slots 0..8
    first = (graph.edge_type == 3) & (graph.src.long() < 2)
    kernels = {tuple(f.tolist()) for f in feats[first]}
    assert kernels == {tuple(w[o, i].reshape(-1).tolist()) for o in range(3) for i in range(2)}


@pytest.mark.parametrize(
    "named, arch, kwargs, match",
    [
        ([("w", (2, 3, 3, 3, 3))], "generic", {}, "unsupported parameter shapes"),
        ([("a.weight", (3, 2)), ("s", ())], "generic", {}, "unsupported parameter shapes"),
        ([("a.weight", (3, 0))], "generic", {}, "unsupported parameter shapes"),
        ([], "generic", {}, "no parameters"),
        ([("a.weight", (3, 2))], "resnet", {}, "unknown arch"),
        ([("h.0.attn.c_attn.weight", (4, 12))], "gpt2", {}, "num_heads is required"),
        ([("fc.weight", (4, 4))], "llama", {"num_heads": 2}, "no attention parameters"),
        (
            [("l.self_attn.q_proj.weight", (6, 6))],
            "llama",
            {"num_heads": 3, "num_key_value_heads": 2},
            "multiple",
        ),
    ],
)
def test_bad_input_errors(named, arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_graph(named, arch=arch, lpe=0, **kwargs)


def test_bad_lpe_and_states():
    g = load("mlp")
    with pytest.raises(ValueError, match="lpe must be"):
        build_graph(g["named"], lpe=torch.zeros(3, 8))
    graph = build_graph(g["named"], lpe=0)
    with pytest.raises(ValueError, match="states has"):
        graph.to_edges(torch.zeros(graph.num_params + 1, 5))


transformers = pytest.importorskip("transformers")


def _tiny(kind):
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_embd=12, n_layer=2, n_head=3, vocab_size=50, n_positions=16)
        )
    if kind == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=12,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=6,
                num_key_value_heads=2,
                vocab_size=40,
                tie_word_embeddings=False,
            )
        )
    if kind == "bert":
        return transformers.BertForMaskedLM(
            transformers.BertConfig(
                hidden_size=12,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=3,
                vocab_size=40,
                max_position_embeddings=16,
            )
        )
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            vocab_size=40,
            tie_word_embeddings=False,
        )
    )


@pytest.mark.parametrize("kind, case", [("gpt2", "gpt2"), ("llama", "llama"), ("qwen3", "qwen3")])
def test_detects_hf_modules(kind, case):
    model = _tiny(kind)
    arch, heads, _ = detect_arch(model)
    assert arch == kind
    g = load(case)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if named != g["named"]:
        pytest.skip("this transformers version lays out parameters differently from the golden model")
    from_module = build_graph(model, lpe=0)
    from_names = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    assert torch.equal(from_module.edge_index(), from_names.edge_index())
    assert heads == g["kwargs"]["num_heads"]


def test_bert_detection():
    arch, heads, kv = detect_arch(_tiny("bert"))
    assert (arch, heads) == ("bert", 3)


@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Gemma"])
def test_llama_like_decoders(family):
    """Decoders with Llama's parameter names (Mistral, Qwen2 with q/k/v biases, Gemma) are detected as llama with
    their config's head counts; a given arch="llama" takes the counts from the config too; the graph is Llama's."""
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{family}Config")(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=4, vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    assert detect_arch(model) == ("llama", 4, 2)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    want = build_graph(named, arch="llama", num_heads=4, num_key_value_heads=2, lpe=0)
    for got in (build_graph(model, lpe=0), build_graph(model, arch="llama", lpe=0)):
        assert torch.equal(got.edge_index(), want.edge_index())


def test_lpe_must_be_finite_and_given_heads_that_differ_from_the_config_warn(caplog):
    named = [("0.weight", (8, 6)), ("0.bias", (8,)), ("2.weight", (3, 8))]
    n = build_graph(named, lpe=0).num_nodes
    bad = torch.zeros(n, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="lpe has 1 NaN/Inf values"):
        build_graph(named, lpe=bad)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=40,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="nino_fast.graph"):
        build_graph(transformers.LlamaForCausalLM(cfg), num_heads=8, lpe=0)
    assert "num_heads=8 given, the model's config has 4" in caplog.text
