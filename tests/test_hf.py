"""NiNo in the Hugging Face Trainer.

The callback driven through its hooks (exact NiNo steps, state round trip), then real ``transformers.Trainer``
runs on a tiny MLP (CPU, a few seconds each): the state saved with every checkpoint and restored from wherever
``resume_from_checkpoint`` points (bitwise the uninterrupted run), missing/corrupt state files (WARNING, window
restarts), NiNo steps in ``log_history`` at exact optimizer steps under gradient accumulation, the wrapper as the
Trainer's optimizer with a transformers scheduler, and the official NiNo checkpoint on a tiny GPT-2."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nino_fast.baselines import linefit_coefficients
from nino_fast.optim import NiNo, k_schedule

from golden import ckpt

hf = pytest.importorskip("nino_fast.hf")
transformers = pytest.importorskip("transformers")

PERIOD, STEPS = 10, 30  # ctx 5 -> snapshots every 2 optimizer steps, NiNo steps at 10, 20, 30
NINO_STEPS = [10, 20, 30]


# ---- the callback through its hooks (no Trainer) ------------------------------------------------------------
def setup(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, max_steps=40, is_world_process_zero=True, log_history=[])
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


def test_callback_state_round_trip_without_trainer(tmp_path, caplog):
    """Outside a Trainer the resume path is unknown: the callback says so and falls back to the Trainer's default
    folder, ``output_dir/checkpoint-<step>``; the restored run continues bitwise."""
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
    with caplog.at_level(logging.WARNING, logger="nino_fast.hf"):
        cb2.on_train_begin(args, state2, None, model=model2, optimizer=opt2)
    assert "checkpoint path is unknown" in caplog.text
    assert cb2.nino.num_snapshots == 2 and cb2.nino.step_idx == 14
    train(model2, opt2, cb2, args, state2, 16, x, y)
    assert torch.equal(flat(model2), flat(model))


def test_callback_refuses_a_nino_optimizer(tmp_path):
    model, opt, args, state = setup(tmp_path)
    nino = NiNo(opt, model=model, ckpt="linefit", period=10, max_train_steps=40)
    with pytest.raises(ValueError, match="already a NiNo wrapper"):
        hf.NiNoCallback("linefit", period=10).on_train_begin(args, state, None, model=model, optimizer=nino)


def test_reachable_after_import_nino_fast_without_importing_transformers():
    """``nino_fast.hf.NiNoCallback`` after a plain ``import nino_fast`` (the README's spelling), while importing
    nino_fast itself imports neither transformers nor lightning (checked in a fresh interpreter)."""
    import nino_fast

    assert nino_fast.hf.NiNoCallback is hf.NiNoCallback and nino_fast.lightning.__name__ == "nino_fast.lightning"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        nino_fast.nope  # noqa: B018
    code = "import sys, nino_fast; assert not {'transformers', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- real Trainer runs ------------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    """A classifier in the Trainer's convention (returns the loss); counts training forwards (micro-batches)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.forwards = 0

    def forward(self, x, labels=None):
        self.forwards += self.training
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def targs(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def make_trainer(out, callbacks=(), model=None, optimizers=(None, None), **kw):
    model = TinyMLP() if model is None else model
    return transformers.Trainer(
        model=model, args=targs(out, **kw), train_dataset=Blobs(), callbacks=list(callbacks), optimizers=optimizers
    )


def nino_logs(trainer):
    return [e for e in trainer.state.log_history if "nino/k" in e]


def params(trainer):
    return flat(trainer.model).clone()


class Stash(transformers.TrainerCallback):
    """Copies every checkpoint folder aside when it is saved (it runs after NiNoCallback's on_save)."""

    def __init__(self, to):
        self.to = to

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"
        shutil.copytree(os.path.join(args.output_dir, name), os.path.join(self.to, name))


def test_callback_in_a_trainer_gives_no_accelerate_advice(tmp_path, caplog):
    """The callback saves NiNo's state itself (nino_state.pt): the wrapper's advice for Accelerate-prepared bases
    (register it for save_state) is not for its users."""
    with caplog.at_level(logging.WARNING, logger="nino_fast.optim"):
        make_trainer(tmp_path, [hf.NiNoCallback("linefit", period=PERIOD)]).train()
    assert "prepared by Accelerate" not in caplog.text


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run (saves every 7 steps and at the end, ``save_total_limit=1``) with a copy of each
    checkpoint."""
    root = tmp_path_factory.mktemp("full")
    stash = root / "stash"
    cb = hf.NiNoCallback("linefit", period=PERIOD)
    trainer = make_trainer(root / "out", [cb, Stash(stash)], save_strategy="steps", save_steps=7, save_total_limit=1)
    trainer.train()
    return SimpleNamespace(params=params(trainer), stash=stash, out=root / "out", trainer=trainer)


def resume(tmp_path, folder, caplog=None):
    """Resume from ``folder`` (moved away from the original output_dir) into a fresh Trainer and model."""
    moved = tmp_path / "elsewhere" / "my-ckpt"
    shutil.copytree(folder, moved)
    cb = hf.NiNoCallback("linefit", period=PERIOD)
    trainer = make_trainer(tmp_path / "new-out", [cb], model=TinyMLP(seed=1))
    with caplog.at_level(logging.WARNING, logger="nino_fast.hf") if caplog else contextlib.nullcontext():
        trainer.train(resume_from_checkpoint=str(moved))
    return trainer, cb


@pytest.fixture(scope="module")
def restarted(full_run, tmp_path_factory):
    """Final parameters of a resume at step 14 whose NiNo state is gone: the window restarted at step 14."""
    tmp = tmp_path_factory.mktemp("restart")
    folder = tmp / "checkpoint-14"
    shutil.copytree(full_run.stash / "checkpoint-14", folder)
    os.remove(folder / hf.STATE_FILE)
    trainer, _ = resume(tmp, folder)
    return params(trainer)


def test_state_saved_with_every_checkpoint(full_run):
    saved = sorted((p.name for p in full_run.stash.iterdir()), key=lambda name: int(name.split("-")[1]))
    assert saved == ["checkpoint-7", "checkpoint-14", "checkpoint-21", "checkpoint-28", "checkpoint-30"]
    assert all((full_run.stash / name / hf.STATE_FILE).is_file() for name in saved)
    # save_total_limit=1 rotated the others away; the survivor has its state too
    assert sorted(p.name for p in full_run.out.iterdir()) == ["checkpoint-30"]
    assert (full_run.out / "checkpoint-30" / hf.STATE_FILE).is_file()


def test_resume_from_moved_checkpoint_is_bitwise(full_run, restarted, tmp_path, caplog):
    """Checkpoint 14 is mid-window (2 snapshots kept): resumed from another folder, the run ends bitwise where
    the uninterrupted one did; without its NiNo state it would not (the window restarts)."""
    trainer, cb = resume(tmp_path, full_run.stash / "checkpoint-14", caplog)
    assert not [r for r in caplog.records if r.name == "nino_fast.hf" and r.levelno >= logging.WARNING]
    assert torch.equal(params(trainer), full_run.params)
    assert not torch.equal(restarted, full_run.params)
    assert [e["step"] for e in nino_logs(trainer)] == NINO_STEPS  # 10 from the checkpoint's log_history


def test_resume_true_finds_the_last_checkpoint(full_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(full_run.stash / "checkpoint-21", out / "checkpoint-21")
    shutil.copytree(full_run.stash / "checkpoint-14", out / "checkpoint-14")
    cb = hf.NiNoCallback("linefit", period=PERIOD)
    trainer = make_trainer(out, model=TinyMLP(seed=1))
    cb.attach(trainer)
    assert cb in trainer.callback_handler.callbacks and cb.trainer is trainer
    assert pickle.loads(pickle.dumps(cb)).trainer is None  # hyperparameter search backends pickle trainers
    trainer.train(resume_from_checkpoint=True)
    assert torch.equal(params(trainer), full_run.params)


def test_resume_missing_state_warns_and_restarts(full_run, restarted, tmp_path, caplog):
    folder = tmp_path / "checkpoint-14"
    shutil.copytree(full_run.stash / "checkpoint-14", folder)
    os.remove(folder / hf.STATE_FILE)
    trainer, _ = resume(tmp_path, folder, caplog)
    assert "no NiNo state" in caplog.text and "snapshot window restarts" in caplog.text
    assert torch.equal(params(trainer), restarted)
    # a restarted window: snapshots at 16, 18, .., 24, so the NiNo steps move to 24 (then 34 > max_steps)
    assert [e["step"] for e in nino_logs(trainer)] == [10, 24]


def _corrupt_bytes(path):
    path.write_bytes(os.urandom(200))


def _edit(path, change):
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


def _wrong_shape(nino_state):
    key = next(k for k, v in nino_state.items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    nino_state[key] = torch.zeros(nino_state[key].shape[0], nino_state[key].shape[1] + 3)


def _wrong_fingerprint(nino_state):
    key = next(k for k in nino_state if "fingerprint" in k)
    value = nino_state[key]
    nino_state[key] = value + 1 if isinstance(value, (int, torch.Tensor)) else f"{value}-other-model"


CORRUPTIONS = {  # name: (how, what the WARNING says)
    "random-bytes": (_corrupt_bytes, "cannot restore"),
    "wrong-shape": (lambda p: _edit(p, lambda s: _wrong_shape(s["nino"])), "shape"),
    "wrong-fingerprint": (lambda p: _edit(p, lambda s: _wrong_fingerprint(s["nino"])), "fingerprint"),
    "wrong-step": (lambda p: _edit(p, lambda s: s.update(global_step=7)), "saved at step 7, resuming at step 14"),
    "not-a-dict": (lambda p: torch.save([1, 2, 3], p), "not a NiNoCallback state file"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_corrupt_state_warns_and_restarts(full_run, restarted, tmp_path, caplog, corruption):
    folder = tmp_path / "checkpoint-14"
    shutil.copytree(full_run.stash / "checkpoint-14", folder)
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(folder / hf.STATE_FILE)
    trainer, _ = resume(tmp_path, folder, caplog)
    assert "cannot restore NiNo's state" in caplog.text and "snapshot window restarts" in caplog.text
    assert reason in caplog.text
    assert trainer.state.global_step == STEPS
    assert torch.equal(params(trainer), restarted)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_callback_logs_nino_steps_at_optimizer_steps(tmp_path, accumulation):
    """NiNo counts optimizer steps, never micro-batches: with 2 micro-batches per step the NiNo steps are still
    at optimizer steps 10, 20, 30 (60 forwards), each logged through Trainer.log."""
    cb = hf.NiNoCallback("linefit", period=PERIOD)
    trainer = make_trainer(
        tmp_path, [cb], per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation
    )
    trainer.train()
    logs = nino_logs(trainer)
    assert [e["step"] for e in logs] == NINO_STEPS
    assert trainer.model.forwards == STEPS * accumulation
    assert [e["nino/k"] for e in logs] == k_schedule(cb.nino.predictor.seq_len, STEPS, PERIOD)
    assert all(e["nino/ok"] == 1.0 and e["nino/update_norm"] > 0 and e["nino/seconds"] >= 0 for e in logs)
    assert all("epoch" in e for e in logs)  # Trainer.log's own fields: it went through Trainer.log


def test_callback_logs_reach_reporters(tmp_path):
    """Trainer.log calls on_log of every callback: what TensorBoard / W&B integrations see."""

    class Seen(transformers.TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "nino/update_norm" in logs:
                self.logs.append((state.global_step, dict(logs)))

    seen = Seen()
    trainer = make_trainer(tmp_path, [hf.NiNoCallback("linefit", period=PERIOD), seen])
    trainer.train()
    assert [s for s, _ in seen.logs] == NINO_STEPS


# ---- the wrapper as the Trainer's optimizer ------------------------------------------------------------------
def nino_trainer(out, model=None, callbacks=(), **kw):
    model = TinyMLP() if model is None else model
    nino = NiNo(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        model=model,
        ckpt="linefit",
        period=PERIOD,
        max_train_steps=STEPS,
    )
    sched = transformers.get_cosine_schedule_with_warmup(nino, num_warmup_steps=3, num_training_steps=STEPS)
    trainer = make_trainer(out, [hf.NiNoLogCallback(), *callbacks], model=model, optimizers=(nino, sched), **kw)
    return trainer, nino, sched


def test_nino_as_trainer_optimizer_with_scheduler_and_accumulation(tmp_path):
    trainer, nino, sched = nino_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.model.forwards == 2 * STEPS
    assert nino.step_idx == STEPS
    assert [e["step"] for e in nino_logs(trainer)] == NINO_STEPS
    assert all(e["nino/ok"] == 1.0 and e["nino/update_norm"] > 0 for e in nino_logs(trainer))
    assert sched.last_epoch == STEPS and nino.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_nino_as_trainer_optimizer_resumes_bitwise(tmp_path):
    """The wrapper's state rides in optimizer.pt: resumed mid-window from a moved checkpoint, bitwise the same."""
    stash = tmp_path / "stash"
    full, _, _ = nino_trainer(tmp_path / "full", callbacks=[Stash(stash)], save_strategy="steps", save_steps=14)
    full.train()
    moved = tmp_path / "elsewhere"
    shutil.copytree(stash / "checkpoint-14", moved)
    again, _, _ = nino_trainer(tmp_path / "again", model=TinyMLP(seed=1))
    again.train(resume_from_checkpoint=str(moved))
    assert torch.equal(params(again), params(full))
    assert [e["step"] for e in nino_logs(again)] == NINO_STEPS


# ---- the official checkpoint on a tiny GPT-2 --------------------------------------------------------------------
class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8, vocab=50):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_official_checkpoint_on_tiny_gpt2(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    cb = hf.NiNoCallback(str(ckpt("nino_no_posw.pt")), period=5)
    args = targs(tmp_path, max_steps=10, per_device_train_batch_size=4)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    logs = nino_logs(trainer)
    assert [e["step"] for e in logs] == [5, 10]
    assert all(e["nino/ok"] == 1.0 and 0 < e["nino/update_norm"] < float("inf") for e in logs)
