"""Bad input fails early and by name: head counts, named shapes, k / states, graph fingerprints, checkpoint
model_args, meta tensors. Each error names the function, the argument, what was expected and what came in."""

from __future__ import annotations

import copy
import dataclasses
import resource

import numpy as np
import pytest
import torch

from nino_fast import NiNoModel, build_graph
from nino_fast.graph import InputTypeError, detect_arch, fingerprint
from nino_fast.graph.build import build_graph_part

from golden import ckpt, load

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _meta_hf(kind: str):
    """A tiny Hugging Face model on the meta device (only its config and shapes are read)."""
    tf = transformers
    with torch.device("meta"):
        if kind == "gpt2":
            return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=12, n_layer=1, n_head=3, vocab_size=20, n_positions=8))
        cfg = tf.LlamaConfig(
            hidden_size=12,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=6,
            num_key_value_heads=2,
            vocab_size=20,
        )
        return tf.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def nino():
    return NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))


@pytest.fixture(scope="module")
def mlp_case():
    g = load("mlp")
    return g["named"], build_graph(g["named"], lpe=g["lpe_t"]), torch.from_numpy(g["states"])


# ---- 1. head counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case, kwargs, err, match",
    [
        ("gpt2", {"num_heads": 5}, ValueError, r"num_heads=5 \(passed\) does not divide the width 12"),
        ("gpt2", {"num_heads": 3, "num_key_value_heads": 1}, ValueError, "num_key_value_heads must be None or .*got 1"),
        ("llama", {"num_heads": 5, "num_key_value_heads": 1}, ValueError, "num_heads=5 .* width 12"),
        ("llama", {"num_heads": 6, "num_key_value_heads": 3}, ValueError, "num_key_value_heads=3 .* width 4"),
        ("bert", {"num_heads": 5}, ValueError, "num_heads=5 .* does not divide"),
        ("vit", {"num_heads": 3}, ValueError, "num_heads=3 .* does not divide"),
        ("gpt2", {"num_heads": 3.0}, TypeError, r"num_heads \(passed\) must be an int >= 1, got 3\.0 \(float\)"),
        ("gpt2", {"num_heads": True}, TypeError, r"num_heads .* got True \(bool\)"),
        ("gpt2", {"num_heads": "3"}, TypeError, "num_heads .* got '3' \\(str\\)"),
        ("gpt2", {"num_heads": 0}, ValueError, "num_heads .* must be an int >= 1, got 0"),
        ("llama", {"num_heads": 6, "num_key_value_heads": -2}, ValueError, "num_key_value_heads .* got -2"),
        ("llama", {"num_heads": 6, "num_key_value_heads": 2.0}, TypeError, "num_key_value_heads .* got 2.0"),
    ],
)
def test_bad_head_counts(case, kwargs, err, match):
    g = load(case)
    with pytest.raises(err, match=f"build_graph\\(arch='{g['arch']}'\\): {match}"):
        build_graph(g["named"], arch=g["arch"], lpe=0, **kwargs)


def test_numpy_head_counts_accepted():
    g = load("llama")
    a = build_graph(g["named"], arch="llama", lpe=0, num_heads=np.int64(6), num_key_value_heads=np.int32(2))
    b = build_graph(g["named"], arch="llama", lpe=0, **g["kwargs"])
    assert torch.equal(a.edge_index(), b.edge_index()) and a.meta["num_heads"] == 6


@pytest.mark.parametrize(
    "kind, attr, value, err, match",
    [
        ("gpt2", "n_head", 5, ValueError, r"num_heads=5 \(detected from the model config\) does not divide"),
        ("gpt2", "n_head", 3.0, TypeError, r"num_heads \(detected from the model config\) must be an int"),
        ("llama", "num_key_value_heads", 3, ValueError, r"num_key_value_heads=3 \(detected .*\) does not divide"),
        ("llama", "num_key_value_heads", 4, ValueError, r"num_key_value_heads=4 \(detected from the model config, d"),
        ("llama", "num_attention_heads", 5, ValueError, r"num_heads=5 is not a multiple .* \(detected from the model"),
    ],
)
def test_bad_heads_from_config(kind, attr, value, err, match):
    model = _meta_hf(kind)
    object.__setattr__(model.config, attr, value)  # past the config's own validation, as an old config file may
    with pytest.raises(err, match=match):
        build_graph(model, lpe=0)


# ---- 2. named shapes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dim, err",
    [
        (3.0, TypeError),
        ("3", TypeError),
        (True, TypeError),
        (np.float32(3), TypeError),
        (0, ValueError),
        (-2, ValueError),
    ],
)
def test_bad_dimensions(dim, err):
    named = [("a.weight", (4, dim)), ("a.bias", (4,))]
    with pytest.raises(err, match=r"build_graph\(arch='generic'\): .*named_shapes\[0\] \('a.weight'\).* positive int"):
        build_graph(named, lpe=0)


@pytest.mark.parametrize(
    "named, err, match",
    [
        ([("", (3, 2))], ValueError, r"named_shapes\[0\]: the name must be a non-empty str, got ''"),
        ([(3, (3, 2))], TypeError, r"named_shapes\[0\]: the name must be a non-empty str, got 3 \(int\)"),
        ([(None, (3, 2))], TypeError, "the name must be a non-empty str, got None"),
        ([("a", (3, 2)), ("a", (2,))], ValueError, r"duplicate parameter names: 'a' at named_shapes\[0\] and \[1\]"),
        ([("a", 3)], TypeError, r"named_shapes\[0\] \('a'\): the shape must be a tuple"),
        ([("a", (3, 2), 1)], TypeError, r"named_shapes\[0\] must be a \(name, shape\) pair"),
        ("a.weight", TypeError, "expected an nn.Module, a dict or a list"),
    ],
)
def test_bad_names_and_pairs(named, err, match):
    with pytest.raises(err, match=match):
        build_graph(named, lpe=0)


def test_accepted_shape_forms_give_one_graph():
    ref = build_graph([("a.weight", (4, 3)), ("a.bias", (4,))], lpe=0)
    forms = [
        [("a.weight", torch.Size([4, 3])), ("a.bias", torch.Size([4]))],
        [("a.weight", [np.int64(4), np.int32(3)]), ("a.bias", [4])],
        {"a.weight": torch.empty(4, 3, device="meta"), "a.bias": torch.empty(4, device="meta")},
    ]
    for named in forms:
        g = build_graph(named, lpe=0)
        assert torch.equal(g.edge_index(), ref.edge_index()) and g.fingerprint == ref.fingerprint
        assert g.param_shapes == ref.param_shapes and all(type(d) is int for _, s in g.param_shapes for d in s)


def test_input_type_error_is_also_a_value_error():
    """Callers that catch ValueError for bad input (the CLI, on_error) keep catching wrong types."""
    with pytest.raises(ValueError):
        build_graph([("a", (3.0,))], lpe=0)
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, ValueError)


# ---- 3. k and states -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, err, match",
    [
        (True, TypeError, r"NiNoModel.nowcast: k must be an int in 1\.\.40, got True \(bool\)"),
        (2.0, TypeError, r"k must be an int in 1\.\.40, got 2\.0 \(float\)"),
        (np.float64(2), TypeError, r"k must be an int in 1\.\.40"),
        ("2", TypeError, r"got '2' \(str\)"),
        (0, ValueError, r"NiNoModel.nowcast: k must be an int in 1\.\.40, got 0"),
        (np.int64(41), ValueError, r"1\.\.40, got 41"),
    ],
)
def test_bad_k(nino, mlp_case, k, err, match):
    _, graph, states = mlp_case
    with pytest.raises(err, match=match):
        nino.nowcast(graph, states, k)


def test_numpy_k_accepted(nino, mlp_case):
    _, graph, states = mlp_case
    assert torch.equal(nino.nowcast(graph, states, np.int64(3)), nino.nowcast(graph, states, 3))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda s: s.numpy(), TypeError, r"NiNoModel.{method}: states must be a \(n_params, ctx\) tensor, got array"),
        (lambda s: s.tolist(), TypeError, r"states must be a \(n_params, ctx\) tensor, got \[\["),
        (lambda s: s.to(torch.int32), TypeError, "NiNoModel.{method}: states must be floating point, got torch.int32"),
        (lambda s: s.to(torch.complex64), TypeError, "states must be floating point, got torch.complex64"),
        (lambda s: s.t(), ValueError, r"NiNoModel.{method}: states has shape \(5, 484\), expected \(n_params=484"),
    ],
)
@pytest.mark.parametrize("method", ["nowcast", "embed"])
def test_bad_states(nino, mlp_case, make, err, match, method):
    _, graph, states = mlp_case
    call = (lambda s: nino.nowcast(graph, s, 1)) if method == "nowcast" else (lambda s: nino.embed(graph, s))
    with pytest.raises(err, match=match.format(method=method)):
        call(make(states.clone()))


def test_graph_must_be_a_neural_graph(nino, mlp_case):
    _, graph, states = mlp_case
    with pytest.raises(TypeError, match="NiNoModel.nowcast: graph must be a NeuralGraph"):
        nino.nowcast(graph.edge_index(), states, 1)


# ---- 4. fingerprints -----------------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_order_sensitive():
    a = [("a.weight", (4, 3)), ("a.bias", (4,))]
    assert fingerprint(a) == fingerprint([("a.weight", torch.Size([4, 3])), ("a.bias", [4])])
    # sha1 of the canonical JSON [[name, [dims]], ...]: the same in every process and version (no hash seed)
    assert fingerprint(a) == "370277c1ce8dd81b9cb42b5eddbfcfd81b032209"
    others = [a[::-1], [("a.weight", (3, 4)), ("a.bias", (4,))], [("b.weight", (4, 3)), ("a.bias", (4,))], a[:1]]
    assert len({fingerprint(x) for x in [a, *others]}) == 5


def test_graph_carries_its_fingerprint_through_copies():
    g = load("llama")
    graph = build_graph(g["named"], arch="llama", lpe=0, **g["kwargs"])
    fp = fingerprint(g["named"])
    assert graph.fingerprint == fp
    assert copy.copy(graph).fingerprint == fp and dataclasses.replace(graph, meta={}).fingerprint == fp
    assert graph.to(torch.device("meta")).fingerprint == fp
    part, _, _ = build_graph_part(g["named"], 1, 3, arch="llama", lpe=0, **g["kwargs"])
    assert part.fingerprint == fp


def test_distributed_shards_keep_the_fingerprint():
    from nino_fast.distributed import build_graph_shard, shard_graph

    g = load("gpt2")
    graph = build_graph(g["named"], arch="gpt2", lpe=0, **g["kwargs"])
    assert shard_graph(graph, 0, 2).local.fingerprint == graph.fingerprint
    assert build_graph_shard(g["named"], 1, 2, arch="gpt2", lpe=0, **g["kwargs"]).local.fingerprint == graph.fingerprint


def test_check_matches_refuses_another_model_with_the_same_count():
    mine = [("a.weight", (4, 3)), ("a.bias", (4,)), ("b.weight", (2, 4))]
    graph = build_graph(mine, lpe=0)
    graph.check_matches(mine)  # its own list passes
    graph.check_matches([(n, torch.Size(s)) for n, s in mine], who="NiNo.step")
    transposed = [("a.weight", (3, 4)), ("a.bias", (4,)), ("b.weight", (2, 4))]  # same 24 parameters
    with pytest.raises(ValueError, match=r"NiNo.step: the neural graph was built for another model: parameter #0"):
        graph.check_matches(transposed, who="NiNo.step")
    renamed = [("a.weight", (4, 3)), ("a.bias", (4,)), ("c.weight", (2, 4))]
    with pytest.raises(ValueError, match=r"nowcast: .*parameter #2 is 'b.weight' \(2, 4\) in the graph, 'c.weight'"):
        graph.check_matches(renamed)
    with pytest.raises(ValueError, match=r"the graph has 3 parameter tensors \(24 parameters\), named_shapes has 2"):
        graph.check_matches(mine[:2])
    with pytest.raises(TypeError, match=r"nowcast: .*named_shapes\[0\] \('a.weight'\)"):
        graph.check_matches([("a.weight", (4.0, 3))])


def test_nowcast_checks_named_shapes(nino, mlp_case):
    named, graph, states = mlp_case
    assert torch.equal(nino.nowcast(graph, states, 2, named_shapes=named), nino.nowcast(graph, states, 2))
    other = [(n.replace("4.", "9."), s) for n, s in named]  # another model, same shapes and count
    with pytest.raises(ValueError, match="NiNoModel.nowcast: the neural graph was built for another model"):
        nino.nowcast(graph, states, 2, named_shapes=other)
    with pytest.raises(ValueError, match="NiNoModel.embed: the neural graph was built for another model"):
        nino.embed(graph, states, named_shapes=other)


# ---- 5. checkpoint model_args --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    return torch.load(ckpt("nino_no_posw.pt"), weights_only=True)


@pytest.mark.parametrize(
    "key, value, err, match",
    [
        ("seq_len", 300000, ValueError, r"model_args\['seq_len'\] must be an int in 1\.\.1000, got 300000"),
        ("seq_len", 0, ValueError, r"model_args\['seq_len'\] must be an int in 1\.\.1000, got 0"),
        ("hid", 0, ValueError, r"model_args\['hid'\] must be an int in 1\.\.4096, got 0"),
        ("hid", 128.0, TypeError, r"model_args\['hid'\] must be an int in 1\.\.4096, got 128\.0 \(float\)"),
        ("hid", True, TypeError, r"model_args\['hid'\] .* got True \(bool\)"),
        ("ctx", 65, ValueError, r"model_args\['ctx'\] must be an int in 1\.\.64, got 65"),
        ("layers", 0, ValueError, r"model_args\['layers'\] must be an int in 1\.\.64, got 0"),
        ("lpe", -1, ValueError, r"model_args\['lpe'\] must be an int in 0\.\.64, got -1"),
        ("vocab_size", 0, ValueError, r"model_args\['vocab_size'\]"),
        ("edge_types", 5, ValueError, r"model_args\['edge_types'\] must be 0 or an int in 14\.\.1024, got 5"),
        ("max_feat_size", -1, ValueError, r"model_args\['max_feat_size'\]"),
        ("upd_scale", float("nan"), ValueError, r"model_args\['upd_scale'\] must be a finite number"),
        ("upd_scale", "1", TypeError, r"model_args\['upd_scale'\]"),
        ("act_name", "swish", ValueError, r"model_args\['act_name'\] must be one of \['silu'"),
        ("gnn", "yes", ValueError, r"model_args\['gnn'\] must be a bool, None or 'none', got 'yes'"),
        ("residual", "no", TypeError, r"model_args\['residual'\] must be a bool"),
        ("towers", 3, ValueError, r"model_args\['towers'\]=3 must divide model_args\['hid'\]=128"),
        ("edge_sample_ratio", 2, ValueError, r"model_args\['edge_sample_ratio'\]"),
    ],
)
def test_bad_model_args(official, key, value, err, match):
    bad = dict(official, model_args={**official["model_args"], key: value})
    with pytest.raises(err, match=r"NiNoModel.from_checkpoint: " + match):
        NiNoModel.from_checkpoint(bad)


def test_model_args_checked_before_any_allocation(official):
    """seq_len=300000 would make a 1.4 GB output layer; it must fail by name without allocating it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    bad = dict(official, model_args={**official["model_args"], "seq_len": 300000})
    with pytest.raises(ValueError, match="seq_len"):
        NiNoModel.from_checkpoint(bad)
    with pytest.raises(ValueError, match=r"NiNoModel: model_args\['seq_len'\]"):
        NiNoModel(seq_len=300000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024


def test_model_args_must_be_a_dict(official):
    with pytest.raises(TypeError, match="NiNoModel.from_checkpoint: model_args must be a dict with str keys"):
        NiNoModel.from_checkpoint(dict(official, model_args=[("hid", 128)]))


def test_weights_must_be_real_floats(official):
    key = "edge_proj.fc.0.weight"
    ints = dict(official, state_dict=dict(official["state_dict"], **{key: official["state_dict"][key].long()}))
    with pytest.raises(ValueError, match=f"weight '{key}' must be a floating tensor, got torch.int64"):
        NiNoModel.from_checkpoint(ints)
    meta = dict(official, state_dict=dict(official["state_dict"], **{key: official["state_dict"][key].to("meta")}))
    with pytest.raises(ValueError, match=f"weight '{key}' is on the meta device; load real weights first"):
        NiNoModel.from_checkpoint(meta)


def test_loading_leaves_the_global_rng_alone(official):
    """Weights are checked on the meta device, then copied: no random initialisation is drawn and discarded."""
    state = torch.get_rng_state()
    NiNoModel.from_checkpoint(official)
    assert torch.equal(state, torch.get_rng_state())


# ---- 6. meta device ------------------------------------------------------------------------------------------
def test_meta_models_build_graphs():
    """A model on the meta device is fine for building a graph: only shapes are read."""
    meta = _meta_hf("llama")
    assert detect_arch(meta) == ("llama", 6, 2)
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    real = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    a, b = build_graph(net, lpe=4), build_graph(real, lpe=4)
    assert torch.equal(a.edge_index(), b.edge_index()) and a.fingerprint == b.fingerprint
    assert build_graph(meta, lpe=0).num_params == sum(p.numel() for p in meta.parameters())


def test_meta_states_and_models_refused(nino, mlp_case):
    _, graph, states = mlp_case
    with pytest.raises(ValueError, match="NiNoModel.nowcast: states is on the meta device; load real weights first"):
        nino.nowcast(graph, states.to("meta"), 1)
    with pytest.raises(ValueError, match="NiNoModel.embed: states is on the meta device"):
        nino.embed(graph, states.to("meta"))
    with torch.device("meta"):
        ghost = NiNoModel(wte_pos_enc=False)
    with pytest.raises(ValueError, match="NiNoModel.nowcast: the model is on the meta device; load real weights"):
        ghost.nowcast(graph, states, 1)
    with pytest.raises(ValueError, match="NiNoModel.embed: the model is on the meta device"):
        ghost.embed(graph, states)
    with pytest.raises(ValueError, match="NiNoModel.nowcast: graph.rowptr is on the meta device"):
        nino.nowcast(graph.to(torch.device("meta")), states, 1)
    with pytest.raises(ValueError, match="build_graph: lpe is on the meta device"):
        build_graph(load("mlp")["named"], lpe=torch.empty(47, 8, device="meta"))
