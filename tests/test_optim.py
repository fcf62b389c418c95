"""The NiNo optimizer wrapper: schedule, snapshot timing, frozen params, groups, failures, exact resume."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nino_fast import NiNoModel, build_graph
from nino_fast.baselines import apply_filter, linefit_coefficients
from nino_fast.optim import NiNo, k_schedule

from golden import ckpt


@pytest.fixture(scope="module")
def nino_gnn():
    return NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))


class Recorder:
    """A predictor that records what it receives and predicts ``last + shift`` (or fails on demand)."""

    needs_graph = False
    lpe = 0

    def __init__(self, ctx=5, seq_len=40, shift=1.0, fail=None):
        self.ctx, self.seq_len, self.shift, self.fail = ctx, seq_len, shift, fail
        self.calls = []

    def nowcast(self, graph, states, k, backend=None):
        self.calls.append((states.clone(), k))
        if self.fail == "raise":
            raise RuntimeError("kernel exploded")
        out = states[:, -1] + self.shift
        if self.fail == "nan":
            out[3] = float("nan")
        return out


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def run(opt, model, steps, x, y, log=None):
    """``steps`` training calls that skip the backward pass when NiNo does not need it."""
    for _ in range(steps):
        if log is not None:
            log.append((flat(model).clone(), opt.need_grads))
        opt.zero_grad()
        if opt.need_grads:
            F.cross_entropy(model(x), y).backward()
        opt.step()


# ---- schedule ----------------------------------------------------------------------------------------------
def test_k_schedule_official_values():
    assert k_schedule(40, 10_000, 1000, 2) == [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    assert k_schedule(40, 500, 1000, 2) == [40]  # fewer steps than a period: one horizon
    assert k_schedule(10, 4000, 1000, 1) == [10, 7, 4, 1]  # p = 1: linear decay
    with pytest.raises(ValueError, match="period"):
        k_schedule(40, 1000, 0)


def test_get_k_follows_schedule_by_period():
    model = mlp()
    opt = NiNo(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        ckpt=Recorder(),
        period=10,
        max_train_steps=100,
    )
    assert [opt.get_k(s) for s in (0, 9, 10, 19, 95, 500)] == [40, 40, 33, 33, 1, 1]


# ---- timing of snapshots and NiNo steps --------------------------------------------------------------------
def test_snapshot_timing_and_need_grads():
    """period 10, ctx 5: snapshots at calls 2, 4, .., 10 (1-based) of the parameters as the call finds them;
    call 10 is a NiNo step (no base step, need_grads False) predicting from those 5 snapshots."""
    model = mlp()
    rec = Recorder()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt=rec, period=10, max_train_steps=100)
    x, y = data()
    log = []
    run(opt, model, 21, x, y, log)
    assert [i + 1 for i, (_, need) in enumerate(log) if not need] == [10, 20]
    assert len(rec.calls) == 2
    states, k = rec.calls[0]
    expected = torch.stack([log[i][0] for i in (1, 3, 5, 7, 9)], 1)
    assert torch.equal(states, expected) and k == 40
    assert torch.equal(log[10][0], log[9][0] + 1.0)  # call 10 wrote the prediction, nothing else
    states, k = rec.calls[1]
    assert torch.equal(states, torch.stack([log[i][0] for i in (11, 13, 15, 17, 19)], 1)) and k == 33
    assert opt.step_idx == 21 and opt.num_snapshots == 0


def test_k_override_and_closure():
    model = mlp()
    rec = Recorder()
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt=rec, period=5, max_train_steps=50)
    x, y = data()
    seen = []

    def closure():
        seen.append(opt.need_grads)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if opt.need_grads:
            loss.backward()
        return loss

    losses = [opt.step(closure, k=7) for _ in range(5)]
    assert all(isinstance(v, torch.Tensor) for v in losses)
    assert seen == [True, True, True, True, False]  # the closure runs once per call, before the NiNo step
    assert rec.calls[0][1] == 7


def test_plain_wrapper_is_the_base_optimizer():
    x, y = data()
    a, b = mlp(), mlp()
    opt_a = NiNo(torch.optim.Adam(a.parameters(), lr=0.01), model=a, ckpt="none")
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(7):
        assert opt_a.need_grads
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert torch.equal(flat(a), flat(b)) and opt_a.step_idx == 7


# ---- the wrapper against a hand-written reference loop -----------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_matches_reference_loop(make):
    """Two NiNo (Linefit) periods equal a plain loop that snapshots and extrapolates by hand, with the base
    optimizer's state carried across NiNo steps (not reset, as in the official wrapper)."""
    x, y = data()
    model, ref = mlp(), mlp()
    opt = NiNo(make(model.parameters()), model=model, ckpt="linefit", period=10, max_train_steps=20)
    ref_opt = make(ref.parameters())
    run(opt, model, 23, x, y)
    snaps, sched = [], k_schedule(40, 20, 10)
    for i in range(23):
        if (i + 1) % 2 == 0:
            snaps.append(flat(ref).clone())
        if len(snaps) == 5:
            pred = apply_filter(torch.stack(snaps, 1), linefit_coefficients(5, sched[i // 10]).float())
            torch.nn.utils.vector_to_parameters(pred, ref.parameters())
            snaps = []
            continue
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    assert torch.equal(flat(model), flat(ref))


@pytest.mark.parametrize("name", ["nino_no_posw.pt", "nino_mlp.pt"])
def test_real_checkpoint_step_equals_nowcast(name):
    """With the released NiNo (GNN, LPE 8) and WNN+ (MLP, no LPE) checkpoints, a NiNo step writes exactly
    ``nowcast(graph of the model, the 5 snapshots, k)``."""
    nino = NiNoModel.from_checkpoint(ckpt(name))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=0.01), model=model, ckpt=str(ckpt(name)), period=10)
    assert (opt.graph.lpe is None) == nino.is_mlp
    x, y = data()
    log = []
    run(opt, model, 10, x, y, log)
    states = torch.stack([log[i][0] for i in (1, 3, 5, 7, 9)], 1)
    expected = nino.nowcast(build_graph(model, lpe=nino.lpe), states, 40)
    assert torch.equal(flat(model), expected)
    assert not torch.equal(expected, states[:, -1])


# ---- frozen parameters and parameter groups ----------------------------------------------------------------
def test_frozen_params_excluded_and_untouched(nino_gnn):
    """The graph is built on the trainable parameters only; a NiNo (GNN) step never writes frozen ones."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = NiNo(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01),
        model=model,
        ckpt=nino_gnn,
        period=5,
        max_train_steps=50,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt.num_params == opt.graph.num_params == trainable
    assert [n for n, _ in opt.graph.param_shapes] == ["2.weight", "2.bias", "4.weight", "4.bias"]
    x, y = data()
    before = flat(model).clone()
    run(opt, model, 5, x, y)
    assert opt.num_snapshots == 0 and opt.step_idx == 5
    assert not torch.equal(flat(model), before)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen, strict=True))


def test_param_groups_and_missing_params_warning(caplog):
    """NiNo writes every trainable parameter whatever its group (lr 0 included); parameters missing from the
    base optimizer are reported."""
    model = mlp()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.0}]
    opt = NiNo(torch.optim.SGD(groups), model=model, ckpt=Recorder(shift=0.5), period=5, max_train_steps=50)
    x, y = data()
    w2 = model[2].weight.detach().clone()
    run(opt, model, 4, x, y)
    assert torch.equal(model[2].weight, w2)  # lr 0: base steps leave it
    run(opt, model, 1, x, y)
    assert torch.equal(model[2].weight, w2 + 0.5)  # the NiNo step writes it
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        NiNo(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model, ckpt=Recorder(), period=5)
    assert "not in the base optimizer" in caplog.text


def test_kernels_wider_than_the_checkpoint_are_left_to_the_base(nino_gnn, caplog):
    """A 5x5 conv has 25 values per edge, the checkpoint 9: NiNo predicts the rest, says so at construction, and
    its steps leave that tensor as it is (the base optimizer trains it between them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-2), model, ckpt=nino_gnn, period=5)
    assert (
        "'0.weight', shape (4, 1, 5, 5): more values per edge" in caplog.text
        and "NiNo does not predict them" in caplog.text
    )
    assert [n for n, _ in opt.graph.param_shapes][0] == "0.bias"
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    wide, rest = model[0].weight.detach().clone(), flat(model[2]).clone()
    opt.step()
    assert opt.last_nino_step["ok"]
    assert torch.equal(model[0].weight, wide) and not torch.equal(flat(model[2]), rest)


def test_scalar_parameters_are_left_to_the_base(nino_gnn, caplog):
    """A learnable scalar (a temperature, CLIP's logit_scale) does not fit a neural graph: NiNo predicts the rest."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.scale = mlp(), nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.net(x) * self.scale

    model = Scaled()
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-2), model, ckpt=nino_gnn, period=5)
    assert "'scale', shape (): neural graphs take 1-D to 4-D tensors" in caplog.text
    x, y = data()
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    scale = model.scale.detach().clone()
    opt.step()
    assert opt.last_nino_step["ok"] and torch.equal(model.scale, scale)


def test_meta_model_refused_before_anything_moves(nino_gnn):
    with torch.device("meta"):
        model = mlp()
    device = next(nino_gnn.parameters()).device
    with pytest.raises(ValueError, match="parameters are on the meta device .* materialise the model"):
        NiNo(torch.optim.AdamW(model.parameters()), model, ckpt=nino_gnn, period=5)
    assert next(nino_gnn.parameters()).device == device


def test_optimizer_params_outside_the_model_warn(caplog):
    model, extra = mlp(), nn.Parameter(torch.ones(2))
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        NiNo(torch.optim.SGD([*model.parameters(), extra], lr=0.1), model=model, ckpt=Recorder(), period=5)
    assert "1 parameters of the base optimizer are not parameters of the model" in caplog.text


def test_keeps_dtype_and_storage():
    model = mlp().to(torch.float64)
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = NiNo(torch.optim.SGD(model.parameters(), lr=0.1), model=model, ckpt="linefit+", period=5)
    x, y = data()
    run(opt, model, 5, x.double(), y)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert [p.data_ptr() for p in model.parameters()] == ptrs


# ---- failures ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fail", ["raise", "nan"])
def test_failed_prediction_is_skipped(fail, caplog):
    model = mlp()
    opt = NiNo(torch.optim.Adam(model.parameters(), lr=0.01), model=model, ckpt=Recorder(fail=fail), period=5)
    x, y = data()
    run(opt, model, 4, x, y)
    params = flat(model).clone()
    state = {(i, k): v.clone() for i, s in enumerate(opt.base_opt.state.values()) for k, v in s.items()}
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        run(opt, model, 1, x, y)
    assert "failed" in caplog.text
    assert torch.equal(flat(model), params)
    after = {(i, k): v for i, s in enumerate(opt.base_opt.state.values()) for k, v in s.items()}
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert opt.num_snapshots == 0 and opt.step_idx == 5
    run(opt, model, 1, x, y)  # training goes on with base steps
    assert not torch.equal(flat(model), params)


@pytest.mark.parametrize("fail", ["raise", "nan"])
def test_failed_prediction_raises(fail):
    model = mlp()
    opt = NiNo(
        torch.optim.Adam(model.parameters(), lr=0.01),
        model=model,
        ckpt=Recorder(fail=fail),
        period=5,
        on_error="raise",
    )
    x, y = data()
    run(opt, model, 4, x, y)
    params = flat(model).clone()
    with pytest.raises((RuntimeError, ValueError), match="exploded|NaN"):
        opt.step()
    assert torch.equal(flat(model), params)
    assert opt.num_snapshots == 4 and opt.step_idx == 4 and opt.need_grads is False  # as before the call


def test_bad_arguments():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="on_error"):
        NiNo(sgd, model=model, ckpt="linefit", on_error="ignore")
    with pytest.raises(ValueError, match="period"):
        NiNo(sgd, model=model, ckpt="linefit", period=3)
    with pytest.raises(FileNotFoundError):
        NiNo(sgd, model=model, ckpt="/nonexistent/nino.pt")
    opt = NiNo(sgd, model=model, ckpt=Recorder(seq_len=40), period=5)
    x, y = data()
    run(opt, model, 4, x, y)
    for bad, err in ((0, ValueError), (41, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="k must be"):
            opt.step(k=bad)
        assert opt.num_snapshots == 4 and opt.step_idx == 4  # checked before anything happened
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\]"):
        opt.after_step(k=100)


# ---- snapshots in bf16, checkpoint and resume --------------------------------------------------------------
def test_bf16_snapshots():
    model = mlp()
    rec = Recorder()
    opt = NiNo(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        ckpt=rec,
        period=5,
        snapshot_dtype=torch.bfloat16,
    )
    assert opt._snapshots.dtype == torch.bfloat16 and opt._snapshots.shape == (5, opt.num_params)
    x, y = data()
    log = []
    run(opt, model, 5, x, y, log)
    states, _ = rec.calls[0]
    assert states.dtype == torch.float32  # widened before the prediction
    expected = torch.stack([v for v, _ in log], 1).to(torch.bfloat16).float()
    assert torch.equal(states, expected)


@pytest.mark.parametrize("snapshot_dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(nino_gnn, snapshot_dtype):
    """Save (model, NiNo) in the middle of a snapshot window, resume in fresh objects: the parameters after 3
    more NiNo (GNN) steps equal those of the uninterrupted run bit for bit."""
    x, y = data()

    def make():
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = NiNo(
            torch.optim.Adam(model.parameters(), lr=0.01),
            model=model,
            ckpt=nino_gnn,
            period=10,
            max_train_steps=40,
            snapshot_dtype=snapshot_dtype,
        )
        return model, opt

    torch.manual_seed(0)
    model, opt = make()
    run(opt, model, 14, x, y)
    assert opt.num_snapshots == 2  # mid-window
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(opt, model, 26, x, y)
    assert opt.step_idx == 40

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    model2, opt2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_idx == 14 and opt2.num_snapshots == 2
    run(opt2, model2, 26, x, y)
    assert torch.equal(flat(model2), flat(model))


def test_load_state_dict_checks_shapes():
    a, b = mlp(), nn.Linear(6, 3)
    opt_a = NiNo(torch.optim.SGD(a.parameters(), lr=0.1), model=a, ckpt="linefit", period=5)
    opt_b = NiNo(torch.optim.SGD(b.parameters(), lr=0.1), model=b, ckpt="linefit", period=5)
    with pytest.raises(ValueError, match="parameters"):
        opt_b.load_state_dict(opt_a.state_dict())
    with pytest.raises(ValueError, match="missing key"):
        opt_a.load_state_dict({"base": {}})
