"""nino_fast.metanet: equivariance to hidden-neuron permutations (MLPs, ConvNets with BatchNorm), block-diagonal
batching, save/load, bad inputs, the zoo (resumable, splits by model), StatNN, the CLI end to end, and the PyG
version of the model (same maths)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nino_fast.cli import main as cli_main
from nino_fast.metanet import MetaNet, StatNN, build_model, build_zoo, collate, graph_input, load_zoo, permute_hidden
from nino_fast.metanet.train import TrainConfig, kendall_tau, pairwise_rank_loss, r2_score, train_metanet
from nino_fast.metanet.zoo import digits_split

pytest.importorskip("sklearn")

MLP = {"kind": "mlp", "hidden": [16, 12], "act": "relu"}
CONV_BN = {"kind": "conv", "channels": [8, 12], "batchnorm": True, "act": "tanh"}
CONV = {"kind": "conv", "channels": [6, 8, 4], "batchnorm": False, "act": "gelu"}


def trained_like(spec: dict, seed: int) -> nn.Module:
    """A model of ``spec`` with random weights and random BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.2, 3.0)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> MetaNet:
    torch.manual_seed(0)
    model = MetaNet(hid=32, edge_dim=8, layers=2)
    with torch.no_grad():
        model.target_mean.fill_(0.5)
        model.target_std.fill_(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("zoo"), size=12, seed=4, progress=False, max_steps=40)  # 6/3/3 split


@pytest.mark.parametrize("spec", [MLP, CONV_BN, CONV], ids=["mlp", "conv_bn", "conv"])
@pytest.mark.parametrize("pool", ["mean", "sum", "attention"])
def test_equivariant_to_hidden_permutations(spec, pool):
    torch.manual_seed(1)
    metanet = MetaNet(hid=32, edge_dim=8, layers=2, pool=pool).eval()
    model = trained_like(spec, seed=2)
    x = digits_split()[2][:64]
    for k in range(3):
        permuted = permute_hidden(model, torch.Generator().manual_seed(k)).eval()
        pairs = zip(model.state_dict().values(), permuted.state_dict().values(), strict=True)
        assert not all(torch.equal(a, b) for a, b in pairs)
        with torch.no_grad():  # the same function first
            torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
        want = metanet.predict(model)
        assert metanet.predict(permuted) == pytest.approx(want, abs=1e-5, rel=1e-5)
        assert metanet.predict(permuted.state_dict()) == pytest.approx(want, abs=1e-5, rel=1e-5)


def test_layernorm_and_batchnorm1d_mlp_equivariant(net):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 24), nn.LayerNorm(24), nn.GELU(), nn.Linear(24, 16), nn.BatchNorm1d(16),
        nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model[5].running_mean.normal_()
        model[5].running_var.uniform_(0.5, 2.0)
    model.eval()
    permuted = permute_hidden(model, torch.Generator().manual_seed(0)).eval()
    x = digits_split()[2][:32]
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    assert net.predict(permuted) == pytest.approx(net.predict(model), abs=1e-5, rel=1e-5)


def test_perturbations_change_the_prediction(net):
    model = trained_like(CONV_BN, seed=4)
    base = net.predict(model)
    for name in ("0.weight", "1.running_var", "4.bias"):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.state_dict()[name].mul_(1.5).add_(0.3)
        assert abs(net.predict(other) - base) > 1e-6, name


def test_batch_equals_one_by_one(net):
    models = [trained_like(s, seed=i) for i, s in enumerate([MLP, CONV_BN, CONV, MLP])]
    batched = net.predict_many(models, batch_size=4)
    alone = torch.tensor([net.predict(m) for m in models])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    batch = collate([graph_input(m, net.max_feat_size) for m in models])
    assert batch.num_graphs == 4 and batch.csr.rowptr[-1] == batch.edge_attr.shape[0]
    assert torch.all(batch.csr.dst[1:] >= batch.csr.dst[:-1])  # still destination-sorted


def test_module_state_dict_and_spec_agree(net):
    model = trained_like(CONV_BN, seed=5)
    want = net.predict(model)
    assert net.predict(model.state_dict()) == pytest.approx(want, abs=1e-6)
    assert net.predict(model.state_dict(), spec=CONV_BN) == pytest.approx(want, abs=1e-6)


def test_save_load_round_trip(net, tmp_path):
    path = tmp_path / "m.pt"
    net.save(path, note="test")
    loaded = MetaNet.load(path)
    assert loaded.config == net.config and loaded.extra == {"note": "test"}
    for spec in (MLP, CONV_BN):
        model = trained_like(spec, seed=6)
        assert loaded.predict(model) == net.predict(model)
    torch.save({"not": "a metanet"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a metanet checkpoint"):
        MetaNet.load(tmp_path / "bad.pt")


def test_bad_inputs(net, tmp_path):
    conv3d = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"unsupported architecture.*0 \(Conv3d\)"):
        net.predict(conv3d)
    with pytest.raises(ValueError, match="unsupported parameter shapes"):  # build_graph's own check
        net.predict(conv3d.state_dict())

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 16), nn.Linear(16, 2)

    with pytest.raises(ValueError, match=r"unsupported architecture.*rnn \(LSTM\)"):
        net.predict(Recurrent())
    with pytest.raises(ValueError, match="unsupported state dict entries"):
        net.predict(Recurrent().state_dict())
    with pytest.raises(ValueError, match=r"att \(MultiheadAttention\)"):
        net.predict(nn.ModuleDict({"att": nn.MultiheadAttention(16, 2), "fc": nn.Linear(16, 2)}))
    with pytest.raises(
        ValueError, match=r"'0.weight' of shape \(2, 1, 5, 5\) has 25 elements per edge.*max_feat_size=9"
    ):
        net.predict(nn.Sequential(nn.Conv2d(1, 2, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)))
    with pytest.raises(ValueError, match="no parameters"):
        net.predict(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        net.predict([1, 2, 3])
    state = trained_like(MLP, seed=0).state_dict()
    state["1.weight"] = torch.zeros(5, 5)  # the spec says (16, 12)^T
    with pytest.raises(ValueError, match="does not match its spec"):
        net.predict(state, spec={**MLP, "hidden": [16, 12]})
    with pytest.raises(ValueError, match="missing keys"):
        net.predict({"1.weight": torch.zeros(16, 64)}, spec=MLP)
    with pytest.raises(ValueError, match="'kind'"):
        build_model({"kind": "rnn"})
    with pytest.raises(ValueError, match="pool"):
        MetaNet(pool="max")
    with pytest.raises(ValueError, match="no zoo"):
        load_zoo(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "zoo.json").write_text(json.dumps({"format": "nino_fast.metanet.zoo/1", "seed": 0, "models": {}}))
    with pytest.raises(ValueError, match="empty"):
        load_zoo(empty)
    assert cli_main(["metanet", "train", "--zoo", str(empty), "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2


def test_zoo_resumable_and_split_by_model(zoo, tmp_path):
    models = load_zoo(zoo)
    assert len(models) == 12 and {m.split for m in models} == {"train", "val", "test"}
    assert all(0.0 <= m.test_acc <= 1.0 for m in models) and all(m.spec["steps"] <= 40 for m in models)
    again = build_zoo(zoo, size=14, seed=4, progress=False, max_steps=40)  # two more; the 12 are kept as they were
    more = load_zoo(again)
    assert len(more) == 14 and [m.test_acc for m in more[:12]] == [m.test_acc for m in models]
    assert [m.split for m in load_zoo(zoo, ("test",))] == ["test"] * len(load_zoo(zoo, ("test",)))
    with pytest.raises(ValueError, match="seed"):
        build_zoo(zoo, size=16, seed=5, progress=False)
    m = more[0]
    module = m.module()  # the stored state dict loads into its spec's model
    x, y = digits_split()[2:]
    assert float((module(x).argmax(1) == y).float().mean()) == pytest.approx(m.test_acc)


def test_statnn_and_scores(zoo):
    models = load_zoo(zoo)
    states, accs = [m.state_dict for m in models], torch.tensor([m.test_acc for m in models])
    pred = StatNN(seed=0, n_estimators=20).fit(states, accs.tolist()).predict(states)
    assert pred.shape == (len(models),)
    assert r2_score(accs, accs) == 1.0 and kendall_tau(accs, accs) == pytest.approx(1.0)
    assert r2_score(torch.full_like(accs, float(accs.mean())), accs) == pytest.approx(0.0, abs=1e-9)


def test_pairwise_rank_loss():
    y = torch.tensor([0.0, 1.0, 2.0])
    right, wrong = pairwise_rank_loss(y, y), pairwise_rank_loss(-y, y)
    assert right < wrong and right > 0
    assert pairwise_rank_loss(torch.zeros(3), torch.zeros(3)) == 0  # no pair apart by more than the margin


def test_cli_train_eval(zoo, tmp_path, capsys):
    out, result = tmp_path / "m.pt", tmp_path / "r.json"
    args = ["--zoo", str(zoo), "--out", str(out), "--epochs", "2", "--hid", "16", "--edge-dim", "8", "--quiet"]
    assert cli_main(["metanet", "train", *args]) == 0
    assert cli_main(["metanet", "eval", "--zoo", str(zoo), "--model", str(out), "--out", str(result)]) == 0
    res = json.loads(result.read_text())
    for key in ("r2", "kendall_tau"):
        assert isinstance(res[key], float) and isinstance(res["baselines"]["statnn"][key], float)
    loaded = MetaNet.load(out)
    assert loaded.extra["history"] and len(loaded.extra["history"]) == 2
    assert isinstance(loaded.predict(load_zoo(zoo)[0].state_dict), float)


def test_training_reduces_the_loss(zoo):
    _, info = train_metanet(zoo, TrainConfig(hid=16, edge_dim=8, layers=2, epochs=6, batch=4, lr=3e-3), progress=False)
    losses = [h["loss"] for h in info["history"]]
    assert min(losses[-2:]) < losses[0]


def test_pyg_version_same_maths():
    pytest.importorskip("torch_geometric")
    from bench.bench_metanet import check_same, metanet_pyg

    torch.manual_seed(0)
    ours = MetaNet(hid=16, edge_dim=8, layers=2)
    batch = collate([graph_input(trained_like(s, seed=i), 9) for i, s in enumerate([MLP, CONV_BN, CONV])])
    assert check_same(ours, metanet_pyg(ours), batch, torch.randn(3)) < 1e-4


def test_transformer_graph():
    pytest.importorskip("transformers")
    from nino_fast.testing import tiny_transformer

    torch.manual_seed(0)
    metanet = MetaNet(hid=16, edge_dim=8, layers=2).eval()
    model = tiny_transformer("gpt2")
    out = metanet.predict(model)
    assert isinstance(out, float) and out == out


def test_too_small_a_zoo_is_refused(tmp_path):
    """Four models leave one for validation: no spread (R^2 would be NaN, the 'best' epoch meaningless): refused."""
    tiny = build_zoo(tmp_path / "tiny", size=4, seed=4, progress=False, max_steps=40)  # 2/1/1
    with pytest.raises(ValueError, match="at least 2 of each are needed"):
        train_metanet(tiny, TrainConfig(epochs=1), progress=False)
