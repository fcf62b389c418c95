"""The Hugging Face Trainer callback, driven through its hooks (no Trainer needed): NiNo steps on top of the
Trainer's optimizer steps, and its snapshot state saved with a checkpoint and read back on resume."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nino_fast.baselines import linefit_coefficients
from nino_fast.optim import k_schedule

hf = pytest.importorskip("nino_fast.hf")
pytest.importorskip("transformers")


def setup(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, max_steps=40, is_world_process_zero=True)
    return model, opt, args, state


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, opt, cb, args, state, steps, x, y, log=None):
    for _ in range(steps):  # what Trainer does around the callback: optimizer step, then on_step_end
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        state.global_step += 1
        if log is not None:
            log.append(flat(model).clone())
        cb.on_step_end(args, state, None)


def test_callback_applies_nino_after_steps(tmp_path):
    model, opt, args, state = setup(tmp_path)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    cb = hf.NiNoCallback("linefit", period=10)
    cb.on_train_begin(args, state, None, model=model, optimizer=opt)
    log = []
    train(model, opt, cb, args, state, 10, x, y, log)
    snaps = torch.stack([log[i] for i in (1, 3, 5, 7, 9)], 1)  # after optimizer steps 2, 4, .., 10
    k = k_schedule(40, 40, 10)[0]
    torch.testing.assert_close(flat(model), snaps @ linefit_coefficients(5, k).float())
    assert cb.nino.num_snapshots == 0 and cb.nino.step_idx == 10


def test_callback_resume_restores_snapshots(tmp_path):
    model, opt, args, state = setup(tmp_path)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    cb = hf.NiNoCallback("linefit+", period=10)
    cb.on_train_begin(args, state, None, model=model, optimizer=opt)
    train(model, opt, cb, args, state, 14, x, y)
    (tmp_path / "checkpoint-14").mkdir()
    cb.on_save(args, state, None)
    assert (tmp_path / "checkpoint-14" / hf.STATE_FILE).is_file()
    model2, state2 = copy.deepcopy(model), copy.deepcopy(state)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)  # plain SGD: no optimizer state to carry
    train(model, opt, cb, args, state, 16, x, y)

    cb2 = hf.NiNoCallback("linefit+", period=10)
    cb2.on_train_begin(args, state2, None, model=model2, optimizer=opt2)
    assert cb2.nino.num_snapshots == 2 and cb2.nino.step_idx == 14
    train(model2, opt2, cb2, args, state2, 16, x, y)
    assert torch.equal(flat(model2), flat(model))
