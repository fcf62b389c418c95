"""Meta-training: trajectory collection (store, resumption), training windows, the differentiable forward paths,
and the trainer (loss, resumption equal to an uninterrupted run, NaN safety, checkpoint format)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nino_fast import NiNoModel, build_graph
from nino_fast._env import torch_threads
from nino_fast.cli import build_parser
from nino_fast.meta import tasks
from nino_fast.meta.collect import collect
from nino_fast.meta.data import WindowSampler, scale_windows
from nino_fast.meta.store import TrajectoryStore
from nino_fast.meta.train import TrainConfig, train
from nino_fast.scaling import scale_params
from nino_fast.testing import assert_meta_paths_agree, assert_window_matches_nowcast

PLAN = [
    dict(family="mlp", widths=[12], act="relu", opt="adamw", lr=3e-3, wd=0.01, seed=1),
    dict(family="convnet", width=4, depth=2, act="gelu", opt="adam", lr=5e-3, wd=0.0, seed=2),
]
for _spec in PLAN:
    _spec.update(steps=80, batch=32, save_every=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    collect(root, PLAN, log=lambda *_: None)
    return root


def cfg(store, out, **kw):
    base = dict(data=str(store), out=str(out), hid=16, steps=6, batch=2, samples_per_traj=2, stride_steps=4)
    base.update(ckpt_every=2, log_every=100)
    return TrainConfig(**{**base, **kw})


def test_plan_excludes_held_out_tasks():
    plan = tasks.default_plan()
    assert not any(tasks.is_held_out(s) for s in plan)
    assert tasks.is_held_out({**tasks.DEMO_TASK, "seed": 5, "lr": 1e-2})
    assert tasks.is_held_out({**tasks.HELDOUT_TASK, "seed": 5})
    with pytest.raises(ValueError, match="held-out"):
        tasks.check_plan([*plan[:2], {**tasks.DEMO_TASK, "seed": 0}])


def test_slow_plan_is_small_lr_deep_mlps_without_the_held_out_one():
    plan = tasks.make_plan("slow")
    assert plan == tasks.slow_plan() and {s["family"] for s in plan} == {"mlp"}
    assert not any(tasks.is_held_out(s) for s in plan)
    assert {s["lr"] for s in plan} == {1e-4, 2e-4, 3e-4, 5e-4, 7e-4, 1e-3}
    assert min(len(s["widths"]) for s in plan) == 2 and max(len(s["widths"]) for s in plan) == 4
    assert len({tasks.task_id(s) for s in plan}) == len(plan) == 48
    # a three-hidden-layer ReLU MLP at the held-out learning rate is there, but never the held-out widths
    assert any(len(s["widths"]) == 3 and s["lr"] == tasks.HELDOUT_TASK["lr"] and s["act"] == "relu" for s in plan)
    assert all(s["widths"] != tasks.HELDOUT_TASK["widths"] for s in plan)


def test_plan_families_filter_keeps_held_out_check(monkeypatch):
    wide = tasks.make_plan("wide")
    plan = tasks.make_plan("wide", families=["mlp", "convnet"])
    assert {s["family"] for s in plan} == {"mlp", "convnet"}
    assert plan == [s for s in wide if s["family"] in ("mlp", "convnet")]
    assert not any(tasks.is_held_out(s) for s in plan)
    with pytest.raises(ValueError, match="unknown families"):
        tasks.make_plan("wide", families=["rnn"])
    with pytest.raises(ValueError, match="no runs"):
        tasks.make_plan("default", families=["gpt2"])
    bad = [{**PLAN[0], "steps": 10}, {**tasks.HELDOUT_TASK, "seed": 0}, {**PLAN[1], "steps": 10}]
    monkeypatch.setitem(tasks.PLANS, "bad", lambda steps, save_every: [dict(s) for s in bad])
    with pytest.raises(ValueError, match="held-out"):
        tasks.make_plan("bad", families=["mlp"])
    assert [s["family"] for s in tasks.make_plan("bad", families=["convnet"])] == ["convnet"]
    # the CLI hands the filtered plan to collect()
    seen = {}
    monkeypatch.setattr("nino_fast.meta.collect.collect", lambda out, plan, **kw: seen.update(plan=plan))
    args = build_parser().parse_args(["collect", "--out", "d", "--plan", "wide", "--families", "mlp", "convnet"])
    assert args.families == ["mlp", "convnet"] and args.func(args) == 0 and seen["plan"] == plan
    with pytest.raises(SystemExit):
        build_parser().parse_args(["collect", "--out", "d", "--families", "rnn"])


def test_collect_store_and_resume(store, capsys):
    st = TrajectoryStore(store)
    assert len(st.runs) == 2 and st.dtype == "float16"
    manifest = json.loads((store / "manifest.json").read_text())
    for rid, entry in manifest["runs"].items():
        assert entry["n_states"] == 80 // 4 + 1 and not entry["diverged"]
        n_params = sum(math.prod(s) for _, s in entry["param_shapes"])
        assert (store / entry["file"]).stat().st_size == entry["n_states"] * n_params * 2
        rows = st.states(rid, [0, entry["n_states"] - 1])
        assert rows.dtype == torch.float32 and torch.isfinite(rows).all() and not torch.equal(rows[0], rows[1])
    # the first row is the initialisation, exactly (up to float16)
    torch.manual_seed(PLAN[0]["seed"])
    init = torch.cat([p.detach().reshape(-1) for p in tasks.build_model(PLAN[0]).parameters()])
    torch.testing.assert_close(st.states(tasks.task_id(PLAN[0]), [0])[0], init, atol=1e-3, rtol=1e-3)
    # rerun: nothing left to do, the disk budget is stated up front; the caller's thread count is left as it was
    lines = []
    with torch_threads(2):
        summary = collect(store, PLAN, log=lines.append, threads=1)
        assert torch.get_num_threads() == 2
    assert summary["new_runs"] == 0 and "disk for all of them" in lines[0]


def test_collect_second_plan_into_a_store(store, tmp_path):
    """Another plan's runs go into an existing store; progress counts this plan's runs, not the store's."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(store, root)
    other = {**PLAN[0], "widths": [8], "seed": 3}
    lines = []
    summary = collect(root, [PLAN[0], other], log=lines.append)
    assert "1 already in" in lines[0] and "1 to do" in lines[0]
    assert lines[1].startswith("  [2/2] " + tasks.task_id(other))
    assert summary["new_runs"] == 1 and summary["runs"] == 3 and len(TrajectoryStore(root).runs) == 3


def test_scale_windows_matches_scale_params(store):
    st = TrajectoryStore(store)
    rid = tasks.task_id(PLAN[1])
    shapes = [(n, tuple(s)) for n, s in st.runs[rid]["param_shapes"]]
    traj = st.states(rid, range(0, 12)).t().contiguous()
    sizes = torch.tensor([math.prod(s) for _, s in shapes])
    mean, sd = scale_windows(traj, torch.repeat_interleave(torch.arange(len(sizes)), sizes), sizes, 5, 3)
    for w in range(3):
        want, _ = scale_params(traj[:, w : w + 5], shapes, "std")
        got = (traj[:, w : w + 5] - mean[:, w : w + 1]) / (sd[:, w : w + 1] + 1e-6)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampler_max_params_keeps_the_small_runs(store, tmp_path):
    sizes = {tasks.task_id(s): sum(math.prod(sh) for _, sh in tasks.named_shapes(s)) for s in PLAN}
    small = min(sizes, key=sizes.get)
    sampler = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=0, max_params=sizes[small])
    assert sampler.runs == [small]
    with pytest.raises(ValueError, match="no run"):
        WindowSampler(store, stride_steps=4, max_params=min(sizes.values()) - 1)
    res = train(cfg(store, tmp_path / "s.pt", steps=2, max_params=sizes[small]), log=lambda *_: None)
    assert res["step"] == 2
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o.pt", "--max-params", "1000"])
    assert args.max_params == 1000


def test_forward_paths_agree_and_match_nowcast(store):
    sampler = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=0)
    torch.manual_seed(0)
    model = NiNoModel(hid=16, wte_pos_enc=False)
    for p in model.parameters():  # the official init (std 0.02) is too small to exercise every branch
        p.data.mul_(8)
    assert_meta_paths_agree(model, sampler.sample(2))
    # one window through the trainer's forward = the inference step at every horizon
    run = sampler.runs[1]
    graph = build_graph(sampler.info(run).graph.param_shapes)
    assert_window_matches_nowcast(model, sampler, run, graph, horizons=(1, 7, 40))


def test_train_loss_finite_and_checkpoint_loads(store, tmp_path):
    with torch_threads(2):
        res = train(cfg(store, tmp_path / "n.pt", steps=8, threads=1), log=lambda *_: None)
        assert torch.get_num_threads() == 2  # train() runs on cfg.threads and restores the caller's count
    assert res["step"] == 8 and len(res["losses"]) == 8 and all(math.isfinite(v) for v in res["losses"])
    assert res["skipped"] == 0 and res["restores"] == 0
    model = NiNoModel.from_checkpoint(tmp_path / "n.pt")
    assert model.hid == 16
    info = torch.load(tmp_path / "n.pt", weights_only=True)["train_info"]
    assert info["steps_done"] == 8
    spec = PLAN[1]
    graph = build_graph(tasks.build_model(spec))
    states = torch.randn(graph.num_params, 5).cumsum(1)
    assert torch.isfinite(model.nowcast(graph, states, 10)).all()


def test_training_reduces_loss(store, tmp_path):
    """Twenty-five steps at a high learning rate lower the loss (the gradients point the right way)."""
    res = train(cfg(store, tmp_path / "n.pt", steps=25, lr=1e-2, init="torch"), log=lambda *_: None)
    first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
    assert last < first


def test_resume_equals_uninterrupted(store, tmp_path):
    full = train(cfg(store, tmp_path / "a.pt"), log=lambda *_: None)
    part = train(cfg(store, tmp_path / "b.pt", stop_at=3), log=lambda *_: None)
    assert part["step"] == 3
    rest = train(cfg(store, tmp_path / "b.pt"), log=lambda *_: None)
    assert rest["step"] == 6 and rest["losses"] == full["losses"]
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options(store, tmp_path):
    """A state continues only its own run: another --steps (its cosine schedule), lr or seed is refused, while
    where to stop and how many threads may change."""
    train(cfg(store, tmp_path / "c.pt", stop_at=2), log=lambda *_: None)
    for change in (dict(steps=20), dict(lr=1e-2), dict(seed=5)):
        with pytest.raises(ValueError, match=f"continues a run with {next(iter(change))}="):
            train(cfg(store, tmp_path / "c.pt", **change), log=lambda *_: None)
    assert train(cfg(store, tmp_path / "c.pt", stop_at=4, threads=2), log=lambda *_: None)["step"] == 4


def test_nan_loss_is_skipped_and_nan_params_restored(store, tmp_path):
    seen = {}

    def hook(stage, trainer, batch):
        if stage == "batch" and trainer.step == 2:  # this step's loss is NaN
            batch.target[0, 0] = float("nan")
        if stage == "update" and trainer.step == 5 and not seen.get("done"):  # parameters blow up once
            seen["done"] = True
            seen["good"] = trainer.good["step"]
            next(trainer.model.parameters()).data[0] = float("nan")

    logs = []
    res = train(cfg(store, tmp_path / "n.pt", steps=8), log=logs.append, hook=hook)
    assert res["skipped"] == 1 and res["restores"] == 1 and res["step"] == 8
    assert seen["good"] == 4 and any("restored the state of step 4" in line for line in logs)
    model = NiNoModel.from_checkpoint(tmp_path / "n.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_registers_meta_commands(tmp_path):
    args = build_parser().parse_args(["collect", "--out", str(tmp_path), "--max-runs", "1"])
    assert args.func.__name__ == "_collect" and args.max_runs == 1
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o.pt", "--hid", "32"])
    assert args.func.__name__ == "_train" and args.hid == 32 and args.path == "folded"


def test_bundled_checkpoint_is_finished_and_continues_a_trend():
    """The shipped model: its three training stages ran to the end without skipped steps or restores, and on the
    demo's ConvNet it extrapolates a straight-line history along the line, further for larger horizons (an
    untrained or collapsed zero predictor fails: it barely moves the parameters)."""
    from torch.nn.utils import parameters_to_vector

    from nino_fast import demo
    from nino_fast.checkpoints import SMALL

    ck = torch.load(SMALL, map_location="cpu", weights_only=False)
    stages, info = [], ck["train_info"]
    while info is not None:
        stages.append(info)
        info = (info.get("init_from") or {}).get("train_info")
    assert len(stages) == 3 and stages[-1]["config"]["init"] == "torch"  # stage 1 (last here) is from scratch
    for info in stages:
        assert info["steps_done"] == info["steps_planned"] > 0
        assert info["skipped_steps"] == 0 and info["restores"] == 0
    nino = NiNoModel.from_checkpoint(ck)
    torch.manual_seed(0)
    net = demo.convnet()
    graph = build_graph(net)
    theta = parameters_to_vector(net.parameters()).detach()
    direction = torch.randn_like(theta) * 1e-3
    states = torch.stack([theta + t * direction for t in range(5)], 1)
    moved = []
    for k in (1, 10, 40):
        delta = nino.nowcast(graph, states, k=k) - states[:, -1]
        assert torch.nn.functional.cosine_similarity(delta, direction, dim=0) > 0.8
        moved.append(float(delta.norm() / direction.norm()))
    assert 0.2 < moved[0] < moved[1] < moved[2]


def test_collect_refuses_a_store_of_other_runs(store, tmp_path):
    """A store holding a run of the same id but another length (or save spacing) is not silently continued."""

    spec = next(iter(TrajectoryStore(store).runs.values()))["spec"]
    with pytest.raises(ValueError, match="with steps="):
        collect(str(store), [dict(spec, steps=spec["steps"] + spec["save_every"])], log=lambda *_: None)
    with pytest.raises(ValueError, match="is not a trajectory store"):
        train(cfg(tmp_path / "nothing", tmp_path / "n.pt"), log=lambda *_: None)
