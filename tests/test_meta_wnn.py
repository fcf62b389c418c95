"""Meta-training the WNN+ MLP (``nino-fast train --arch wnn``): loss decreases, the checkpoint round-trips through
``NiNoModel.from_checkpoint`` and drives ``nino_fast.NiNo``, resumption equals an uninterrupted run, NaN safety."""

from __future__ import annotations

import math

import pytest
import torch
from test_meta import PLAN
from test_meta import cfg as meta_cfg

from nino_fast import NiNo, NiNoModel, build_graph
from nino_fast.cli import build_parser
from nino_fast.meta import tasks
from nino_fast.meta.collect import collect
from nino_fast.meta.data import WindowSampler
from nino_fast.meta.forward import predict_wnn, wnn_loss
from nino_fast.meta.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_wnn")
    collect(root, PLAN, log=lambda *_: None)
    return root


def cfg(store, out, **kw):
    """test_meta's small training config, with the WNN+ architecture."""
    return meta_cfg(store, out, **{"arch": "wnn", **kw})


def quiet(*_):
    pass


def test_param_batch_is_the_graph_batch_per_parameter(store):
    """The WNN+ batch holds the same windows as the GNN batch (same generator use), one row per parameter."""
    a = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=3)
    b = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=3)
    pb, gb = a.sample_params(2), b.sample(2)
    assert pb.x.shape == (gb.row_of_param.numel(), 5) and pb.target.shape == pb.mask.shape == (pb.x.shape[0], 40)
    torch.testing.assert_close(pb.target, gb.target.index_select(0, gb.row_of_param))
    torch.testing.assert_close(pb.mask, gb.mask.index_select(0, gb.row_of_param))
    assert pb.edge_type.shape == (pb.x.shape[0],) and int(pb.edge_type.max()) < 15


def test_wnn_training_reduces_loss_and_checkpoint_loads(store, tmp_path):
    """Twenty-five steps lower the loss on fixed held-aside batches (per-batch noise hides it in the training
    losses), and the checkpoint loads as a WNN+ NiNoModel."""
    train(cfg(store, tmp_path / "w0.pt", steps=25, lr=1e-2, stop_at=0), log=quiet)  # the initial model
    res = train(cfg(store, tmp_path / "w.pt", steps=25, lr=1e-2), log=quiet)
    assert res["step"] == 25 and res["skipped"] == 0 and res["restores"] == 0
    assert all(math.isfinite(v) for v in res["losses"])
    held = WindowSampler(store, stride_steps=4, samples_per_traj=2, seed=123, lpe=0)
    batches = [held.sample_params(2) for _ in range(4)]

    def held_loss(path):
        model = NiNoModel.from_checkpoint(path)
        with torch.no_grad():
            return sum(wnn_loss(predict_wnn(model, b), b).item() for b in batches) / len(batches)

    assert held_loss(tmp_path / "w.pt") < 0.95 * held_loss(tmp_path / "w0.pt")
    model = NiNoModel.from_checkpoint(tmp_path / "w.pt")
    ckpt = torch.load(tmp_path / "w.pt", weights_only=True)
    assert model.is_mlp and model.hid == 16 and ckpt["model_args"]["gnn"] is False
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    assert ckpt["train_info"]["config"]["arch"] == "wnn"


def test_wnn_forward_matches_nowcast(store, tmp_path):
    """The trainer's forward at horizon k = the inference step of the loaded checkpoint."""
    train(cfg(store, tmp_path / "w.pt", steps=3, init="torch", lr=1e-2), log=quiet)
    model = NiNoModel.from_checkpoint(tmp_path / "w.pt")
    for p in model.edge_mlp.fc[-1].parameters():  # the head is near zero after 3 steps: give it weight
        p.data.normal_(0, 0.3)
    sampler = WindowSampler(store, stride_steps=4, samples_per_traj=1, seed=0, lpe=0)
    info, _, x, _ = sampler.trajectory(sampler.runs[0])[0]
    pb = sampler.sample_params(1)
    with torch.no_grad():
        delta = predict_wnn(model, type(pb)(x, info.graph.edge_type[info.edge_of_param], pb.target, pb.mask, 1))
    graph = build_graph(info.graph.param_shapes, lpe=0)
    for k in (1, 9, 40):
        torch.testing.assert_close(x[:, -1] + delta[:, k - 1], model.nowcast(graph, x, k), atol=2e-4, rtol=2e-4)


def test_wnn_checkpoint_drives_nino_optimizer(store, tmp_path):
    train(cfg(store, tmp_path / "w.pt", steps=4, init="torch"), log=quiet)
    torch.manual_seed(0)
    model = tasks.build_model(PLAN[0])
    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, ckpt=str(tmp_path / "w.pt"), period=10)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(20):  # two NiNo steps
        opt.zero_grad()
        if opt.need_grads:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_wnn_resume_equals_uninterrupted(store, tmp_path):
    full = train(cfg(store, tmp_path / "a.pt"), log=quiet)
    part = train(cfg(store, tmp_path / "b.pt", stop_at=3), log=quiet)
    assert part["step"] == 3
    rest = train(cfg(store, tmp_path / "b.pt"), log=quiet)
    assert rest["step"] == 6 and rest["losses"] == full["losses"]
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="arch='wnn'"):  # the state file of a WNN+ run is not a GNN's
        train(cfg(store, tmp_path / "b.pt", arch="nino", steps=8), log=quiet)


def test_wnn_nan_loss_is_skipped_and_nan_params_restored(store, tmp_path):
    seen = {}

    def hook(stage, trainer, batch):
        if stage == "batch" and trainer.step == 2:
            batch.target[0, 0] = float("nan")
        if stage == "update" and trainer.step == 5 and not seen.get("done"):
            seen["done"] = True
            next(trainer.model.parameters()).data[0] = float("nan")

    logs = []
    res = train(cfg(store, tmp_path / "n.pt", steps=8), log=logs.append, hook=hook)
    assert res["skipped"] == 1 and res["restores"] == 1 and res["step"] == 8
    assert any("restored the state of step 4" in line for line in logs)
    model = NiNoModel.from_checkpoint(tmp_path / "n.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_wnn_loss_is_masked_mean():
    pred, target = torch.zeros(3, 4), torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[1.0, 1, 0, 0]] * 3)
    pb = type("PB", (), dict(target=target, mask=mask))
    assert wnn_loss(pred, pb).item() == pytest.approx((0 + 1 + 4 + 5 + 8 + 9) / 6)


def test_bad_arch_and_cli(store, tmp_path):
    with pytest.raises(ValueError, match="arch must be"):
        train(cfg(store, tmp_path / "x.pt", arch="gnn"), log=quiet)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o.pt", "--arch", "wnn"])
    assert args.arch == "wnn"
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o.pt"]).arch == "nino"


def test_init_from_checkpoint(store, tmp_path):
    """``init_from`` starts from a checkpoint's weights (GNN or WNN+), and refuses another architecture."""
    for arch in ("nino", "wnn"):
        train(cfg(store, tmp_path / f"{arch}.pt", arch=arch, steps=3, init="torch", lr=1e-2), log=quiet)
        train(
            cfg(store, tmp_path / f"{arch}0.pt", arch=arch, init_from=str(tmp_path / f"{arch}.pt"), stop_at=0),
            log=quiet,
        )
        a = torch.load(tmp_path / f"{arch}.pt", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / f"{arch}0.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        # the starting checkpoint's training record is kept in the fine-tuned one's
        parent = torch.load(tmp_path / f"{arch}.pt", weights_only=True)["train_info"]
        child = torch.load(tmp_path / f"{arch}0.pt", weights_only=True)["train_info"]
        assert child["init_from"] == dict(path=str(tmp_path / f"{arch}.pt"), train_info=parent)
        assert "init_from" not in parent
        assert NiNoModel.from_checkpoint(tmp_path / f"{arch}.pt").train_info == parent  # kept on loading
    with pytest.raises(ValueError, match="not a checkpoint of this architecture"):
        train(cfg(store, tmp_path / "x.pt", arch="nino", init_from=str(tmp_path / "wnn.pt")), log=quiet)
    with pytest.raises(ValueError, match="not a checkpoint of this architecture"):
        train(cfg(store, tmp_path / "y.pt", arch="wnn", hid=32, init_from=str(tmp_path / "wnn.pt")), log=quiet)
