"""Transformer tasks of the meta-training data: character-level GPT-2 / Llama models on Python standard-library
source. Specs build, train a few steps, their neural graphs build (as ``nino_fast.NiNo`` builds them), the
store and the trainers use those graphs, and the plans still exclude the held-out tasks."""

from __future__ import annotations

import math

import pytest
import torch

from nino_fast import NiNoModel, build_graph
from nino_fast.cli import build_parser
from nino_fast.graph import detect_arch
from nino_fast.meta import tasks
from nino_fast.meta.collect import collect
from nino_fast.meta.data import WindowSampler
from nino_fast.meta.store import TrajectoryStore
from nino_fast.meta.train import TrainConfig, train

pytest.importorskip("transformers")

GPT2 = dict(family="gpt2", width=16, depth=1, heads=2, opt="adamw", lr=3e-3, wd=0.01, seed=3)
LLAMA = dict(family="llama", width=16, depth=2, heads=4, kv_heads=2, opt="adam", lr=3e-3, wd=0.0, seed=4)
MLP = dict(family="mlp", widths=[12], act="relu", opt="adamw", lr=3e-3, wd=0.01, seed=1)
PLAN = [GPT2, LLAMA, MLP]
for _spec in PLAN:
    _spec.update(steps=80, batch=8, save_every=4)
GPT2["seq"] = LLAMA["seq"] = 32


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_trf")
    collect(root, PLAN, log=quiet)
    return root


def test_corpus_is_deterministic():
    train_ids, val_ids, info = tasks.char_corpus()
    again = tasks.char_corpus()
    assert torch.equal(train_ids, again[0]) and torch.equal(val_ids, again[1]) and info == again[2]
    assert len(tasks.VOCAB) == 96 and int(train_ids.max()) < 96 and int(train_ids.min()) >= 0
    assert info["chars"] == len(train_ids) + len(val_ids) > 50_000 and len(val_ids) * 9 <= len(train_ids) + 9
    assert info["files"] == list(tasks.CORPUS_FILES)


@pytest.mark.parametrize("spec", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_transformer_spec_builds_and_graph_matches_nino(spec):
    torch.manual_seed(0)
    model = tasks.build_model(spec)
    assert tasks.named_shapes(spec) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    args = tasks.graph_args(spec)
    arch, heads, kv = detect_arch(model)
    assert (args["arch"], args["num_heads"], args["num_key_value_heads"]) == (arch, heads, kv)
    from_spec = build_graph(tasks.named_shapes(spec), lpe=8, **args)
    from_module = build_graph(model, lpe=8)  # what nino_fast.NiNo builds for the live model
    assert from_spec.arch == spec["family"] and from_spec.num_params == sum(p.numel() for p in model.parameters())
    assert torch.equal(from_spec.src, from_module.src) and torch.equal(from_spec.dst, from_module.dst)
    assert torch.equal(from_spec.edge_type, from_module.edge_type)
    assert torch.equal(from_spec.param_pos, from_module.param_pos)
    assert tasks.task_id(spec).startswith(f"{spec['family']}-w16-d")
    assert not tasks.is_held_out(spec)


def test_transformer_trains_a_few_steps():
    spec = {**LLAMA, "steps": 40, "save_every": 10}
    snaps = []
    res = tasks.run_task(spec, lambda i, flat, val: snaps.append((i, flat.clone(), val)))
    assert not res["diverged"] and res["data"]["files"] == list(tasks.CORPUS_FILES)
    assert [i for i, *_ in snaps] == [0, 1, 2, 3, 4]
    assert snaps[0][2] == pytest.approx(math.log(96), abs=0.3)  # a fresh LM is near-uniform over the vocabulary
    assert snaps[-1][2] < snaps[0][2] - 0.5
    assert not torch.equal(snaps[0][1], snaps[-1][1])
    # deterministic: the same spec gives the same trajectory
    again = []
    tasks.run_task(spec, lambda i, flat, val: again.append(flat.clone()))
    assert all(torch.equal(a, b[1]) for a, b in zip(again, snaps, strict=True))


def test_store_records_graph_args_and_sampler_uses_them(store):
    st = TrajectoryStore(store)
    entry = st.runs[tasks.task_id(LLAMA)]
    assert entry["graph_args"] == dict(arch="llama", num_heads=4, num_key_value_heads=2)
    assert entry["data"]["sha256"] == tasks.char_corpus()[2]["sha256"] and not entry["diverged"]
    assert "graph_args" not in st.runs[tasks.task_id(MLP)]
    sampler = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=0)
    for spec in PLAN:
        info = sampler.info(tasks.task_id(spec))
        assert info.graph.arch == ("generic" if spec["family"] == "mlp" else spec["family"])
    b = sampler.sample(3)
    assert b.num_graphs == 6 and torch.isfinite(b.target).all() and torch.isfinite(b.raw).all()


@pytest.mark.parametrize("arch", ["nino", "wnn"])
def test_train_on_transformer_trajectories(store, tmp_path, arch):
    cfg = TrainConfig(
        data=str(store), out=str(tmp_path / "t.pt"), hid=16, steps=4, batch=2, samples_per_traj=2, stride_steps=4
    )
    cfg.arch = arch
    res = train(cfg, log=quiet)
    assert res["step"] == 4 and res["skipped"] == 0 and all(math.isfinite(v) for v in res["losses"])
    model = NiNoModel.from_checkpoint(tmp_path / "t.pt")
    graph = build_graph(tasks.build_model(GPT2), lpe=model.lpe)
    states = torch.randn(graph.num_params, 5).cumsum(1)
    assert torch.isfinite(model.nowcast(graph, states, 3)).all()


def test_plans_exclude_held_out_tasks():
    wide = tasks.make_plan("wide")
    families = {s["family"] for s in wide}
    assert families == {"mlp", "convnet", "gpt2", "llama"}
    assert not any(tasks.is_held_out(s) for s in wide)
    assert min(s["lr"] for s in wide if s["family"] == "mlp") <= 1e-4
    assert all(s["steps"] == 1200 for s in wide if tasks.is_transformer(s))
    with pytest.raises(ValueError, match="held-out"):
        tasks.check_plan([*wide[:3], {**tasks.HELDOUT_TASK, "seed": 0, "lr": 1e-3}])
    with pytest.raises(ValueError, match="held-out"):
        tasks.check_plan([*wide[:3], {**tasks.DEMO_TASK, "depth": 2, "seed": 0}])
    default = tasks.make_plan("default")
    assert default == tasks.default_plan() and {s["family"] for s in default} == {"mlp", "convnet"}
    with pytest.raises(ValueError, match="unknown plan"):
        tasks.make_plan("huge")
    with pytest.raises(ValueError, match="unknown family"):
        tasks.build_model({**GPT2, "family": "rnn"})
    with pytest.raises(ValueError, match="multiple of heads"):
        tasks.build_model({**GPT2, "heads": 3})
    assert build_parser().parse_args(["collect", "--out", "d", "--plan", "wide"]).plan == "wide"


def test_lm_plan_covers_the_issue_grid_and_holds_out_the_evaluation_tasks():
    plan = tasks.make_plan("lm")
    assert {s["family"] for s in plan} == {"gpt2", "llama"} and len(plan) == 27
    assert {s.get("tie") for s in plan} == {True, False} and {s["sched"] for s in plan} == {"constant", "cosine"}
    assert any(s.get("kv_heads", s["heads"]) < s["heads"] for s in plan)  # grouped-query attention
    assert min(s["width"] for s in plan) == 32 and max(s["width"] for s in plan) == 256
    assert {s["seq"] for s in plan} >= {64, 256} and {s["opt"] for s in plan} == {"adamw", "adam"}
    assert min(s["lr"] for s in plan) == 3e-4 and max(s["lr"] for s in plan) == 3e-3
    assert {s["text"] for s in plan} == {"src-a", "src-b", "src-c"} and not any(map(tasks.is_held_out, plan))
    for name, task in tasks.HELDOUT_LM_TASKS.items():
        assert tasks.is_held_out({**task, "seed": 0}), name
        with pytest.raises(ValueError, match="held-out"):
            tasks.check_plan([*plan[:2], {**plan[2], "text": task["text"]}])
    with pytest.raises(ValueError, match="held-out"):
        tasks.check_plan([{**plan[0], "width": tasks.HELDOUT_LM_WIDTH, "heads": 4}])
    # the texts are distinct, deterministic and in the vocabulary; the docs are English prose, not source
    shas = {name: tasks.char_corpus(name)[2]["sha256"] for name in tasks.TEXTS}
    assert len(set(shas.values())) == len(tasks.TEXTS)
    docs = tasks._docs_text()
    assert len(docs) == tasks.DOCS_CHARS and "topics = {" not in docs and " the " in docs
    with pytest.raises(ValueError, match="unknown text"):
        tasks.char_corpus("wiki")


def test_lm_plan_grows_by_rounds_and_keeps_its_first_runs():
    """--rounds N: more runs with new seeds; the first rounds are the same specs, so a store is continued."""
    three, six = tasks.make_plan("lm"), tasks.make_plan("lm", rounds=6)
    assert len(six) == 54 and six[:27] == three
    assert len({s["seed"] for s in six}) == 54 and not any(map(tasks.is_held_out, six))
    with pytest.raises(ValueError, match="has no rounds"):
        tasks.make_plan("default", rounds=2)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        tasks.make_plan("lm", rounds=0)
    assert build_parser().parse_args(["collect", "--out", "d", "--plan", "lm", "--rounds", "6"]).rounds == 6


def test_cosine_schedule_warms_up_and_decays_to_a_tenth():
    spec = {**GPT2, "sched": "cosine", "steps": 100}
    model = tasks.build_model(spec)
    opt = tasks.make_optimizer(spec, model.parameters())
    sched = tasks.make_schedule(spec, opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(spec["lr"] / 5) and max(lrs) == pytest.approx(spec["lr"])
    assert lrs[-1] == pytest.approx(spec["lr"] / 10, rel=0.05) and lrs == sorted(lrs[:5]) + lrs[5:]
    assert tasks.make_schedule(GPT2, opt) is None
    with pytest.raises(ValueError, match="unknown schedule"):
        tasks.make_schedule({**GPT2, "sched": "step"}, opt)
    assert "-cos" in tasks.task_id(spec) and "-tied" in tasks.task_id({**spec, "tie": True})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tied_and_untied_embeddings_build_and_run(family):
    for tie in (True, False):
        spec = {**(GPT2 if family == "gpt2" else LLAMA), "tie": tie, "steps": 4, "save_every": 2}
        names = [n for n, _ in tasks.named_shapes(spec)]
        assert any("lm_head" in n for n in names) != tie
        graph = build_graph(tasks.build_model(spec), lpe=8)
        assert graph.num_params == sum(math.prod(s) for _, s in tasks.named_shapes(spec))
        assert not tasks.run_task(spec, lambda *a: None)["diverged"]


def test_wte_pos_enc_training_paths_agree_and_match_nowcast(store):
    """The paper's word-position embedding in meta-training: the fused paths match the oracle (loss and every
    gradient, the position embedding's included) and one window's prediction is NiNoModel.nowcast's."""
    from nino_fast.testing import assert_meta_paths_agree, assert_window_matches_nowcast

    sampler = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=1, runs=[tasks.task_id(GPT2)])
    torch.manual_seed(0)
    model = NiNoModel(hid=16, wte_pos_enc=True, vocab_size=len(tasks.VOCAB))
    for p in model.parameters():
        p.data.mul_(8)
    b = sampler.sample(2)
    assert int(b.pos_w.max()) == len(tasks.VOCAB)  # the token rows of the embedding, 1-based
    grads = assert_meta_paths_agree(model, b)
    assert grads["wte_pos_enc_layer.weight"].abs().sum() > 0
    graph = build_graph(tasks.build_model(GPT2), lpe=8)
    assert_window_matches_nowcast(model, sampler, sampler.runs[0], graph, horizons=(1, 40))


def test_wte_pos_enc_warm_start_from_a_checkpoint_without_it(store, tmp_path):
    """--wte-pos-enc --init-from a no-posw checkpoint starts from that checkpoint's predictions (a zero position
    embedding), trains it, and writes a checkpoint NiNoModel.from_checkpoint loads with the embedding."""
    base = dict(data=str(store), hid=16, steps=3, batch=2, samples_per_traj=2, stride_steps=4, log_every=100)
    train(TrainConfig(out=str(tmp_path / "plain.pt"), **base), log=quiet)
    plain = NiNoModel.from_checkpoint(tmp_path / "plain.pt")
    assert not plain.wte_pos_enc
    cfg = TrainConfig(out=str(tmp_path / "posw.pt"), wte_pos_enc=True, vocab_size=128, **base)
    cfg.init_from, cfg.stop_at = str(tmp_path / "plain.pt"), 0
    train(cfg, log=quiet)
    start = NiNoModel.from_checkpoint(tmp_path / "posw.pt")
    assert start.wte_pos_enc and start.vocab_size == 128
    assert not start.wte_pos_enc_layer.weight.any()
    graph = build_graph(tasks.build_model(GPT2), lpe=8)
    states = torch.randn(graph.num_params, 5).cumsum(1)
    torch.testing.assert_close(start.nowcast(graph, states, 7), plain.nowcast(graph, states, 7), atol=0, rtol=0)
    cfg.stop_at = None
    res = train(cfg, log=quiet)
    assert res["step"] == 3 and all(math.isfinite(v) for v in res["losses"])
    assert NiNoModel.from_checkpoint(tmp_path / "posw.pt").wte_pos_enc_layer.weight.any()
    with pytest.raises(ValueError, match="no nodes"):
        train(TrainConfig(out=str(tmp_path / "w.pt"), arch="wnn", wte_pos_enc=True, **base), log=quiet)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o.pt", "--wte-pos-enc", "--vocab-size", "96"])
    assert args.wte_pos_enc and args.vocab_size == 96
