"""NiNo in PyTorch Lightning: the documented ``configure_optimizers`` recipe (the wrapper is the optimizer, with a
per-step scheduler), on CPU with a tiny MLP. With ``accumulate_grad_batches=2`` the NiNo steps land at exact
optimizer steps (never micro-batches) and replace the parameters by the prediction from the right snapshots."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nino_fast.baselines import linefit_coefficients
from nino_fast.optim import NiNo, k_schedule

L = pytest.importorskip("lightning")
nl = pytest.importorskip("nino_fast.lightning")

# Lightning 2.6 with torch 2.13: its own use of a deprecated torch pytree class, nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

PERIOD, STEPS, ACCUMULATE = 10, 30, 2  # ctx 5: a snapshot every 2 optimizer steps, NiNo steps at 10, 20, 30


class Lit(L.LightningModule):
    """The README recipe: ``configure_optimizers`` returns the wrapper and a per-step scheduler on it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.micro_batches = 0  # training_step calls over all epochs (batch_idx restarts every epoch)

    def training_step(self, batch, batch_idx):
        self.micro_batches += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = NiNo(
            torch.optim.AdamW(self.parameters(), lr=1e-2),
            model=self,
            ckpt="linefit",
            period=PERIOD,
            max_train_steps=self.trainer.max_steps,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Record(L.Callback):
    """Parameters after every optimizer step, and (optimizer step, micro-batch) of every NiNo step."""

    def __init__(self):
        self.after = {0: None}  # optimizer step -> flat parameters after it
        self.nino_at, self._seen = [], None

    def on_train_start(self, trainer, pl_module):
        self.after[0] = flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = flat(pl_module)
        info = nl.find_nino(trainer).last_nino_step
        if info is not None and info is not self._seen:
            self._seen = info
            self.nino_at.append((info["step"], trainer.global_step, pl_module.micro_batches, info["ok"]))


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def data():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def fit(*callbacks, logger=False):
    model = Lit()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        enable_checkpointing=False,
    )
    trainer.fit(model, data())
    return trainer, model


class Metrics(L.pytorch.loggers.Logger):
    """A logger that keeps every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    name, version = "metrics", 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_recipe_nino_steps_at_exact_optimizer_steps():
    rec, metrics = Record(), Metrics()
    trainer, model = fit(rec, nl.NiNoLogCallback(), logger=metrics)
    # each NiNo step reaches the loggers once, at its optimizer step
    assert [(step, m["nino/k"]) for step, m in metrics.calls if "nino/k" in m] == [
        (s, k) for s, k in zip((10, 20, 30), k_schedule(40, STEPS, PERIOD), strict=True)
    ]
    nino = nl.find_nino(trainer)
    assert isinstance(nino, NiNo) and nino.step_idx == STEPS == trainer.global_step
    # (NiNo's step, Lightning's global step, micro-batches so far, ok): at optimizer steps 10, 20, 30 = the
    # 20th, 40th, 60th micro-batch (counting micro-batches would have put them at optimizer steps 5, 10, 15, ..)
    assert rec.nino_at == [(s, s, ACCUMULATE * s, True) for s in (10, 20, 30)]
    assert model.micro_batches == ACCUMULATE * STEPS

    # the parameters were replaced: after step 10 they are Linefit's prediction from the snapshots taken when
    # step() was called for the 2nd, 4th, .., 10th time, i.e. the parameters after steps 1, 3, 5, 7, 9
    ks = k_schedule(nino.predictor.seq_len, STEPS, PERIOD)
    for end, k in zip((10, 20, 30), ks, strict=True):
        snaps = torch.stack([rec.after[end - PERIOD + i] for i in (1, 3, 5, 7, 9)], 1)
        torch.testing.assert_close(rec.after[end], snaps @ linefit_coefficients(5, k).float())
        assert not torch.equal(rec.after[end], rec.after[end - 1])

    # the scheduler drives the shared param groups; the log callback reported the last NiNo step
    assert nino.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert trainer.callback_metrics["nino/k"].item() == ks[-1]
    assert trainer.callback_metrics["nino/ok"].item() == 1.0
    assert trainer.callback_metrics["nino/update_norm"].item() > 0
