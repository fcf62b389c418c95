"""NiNo in PyTorch Lightning (optional dependency: ``lightning``, or the older ``pytorch_lightning``).

The wrapper *is* the optimizer: return it from ``configure_optimizers``. Lightning then calls its ``step`` once
per optimizer step with the closure that runs ``training_step`` and the backward pass (after
``accumulate_grad_batches`` micro-batches), so NiNo counts optimizer steps, never micro-batches; on a NiNo step
the wrapper calls the closure once and replaces the parameters instead of the base step::

    import lightning as L
    from nino_fast import NiNo
    from nino_fast.lightning import NiNoLogCallback

    class Lit(L.LightningModule):
        ...
        def configure_optimizers(self):
            opt = NiNo(torch.optim.AdamW(self.parameters(), lr=1e-3), model=self, ckpt="nino.pt",
                       period=1000, max_train_steps=self.trainer.max_steps)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    L.Trainer(max_steps=10_000, accumulate_grad_batches=4, callbacks=[NiNoLogCallback()]).fit(Lit(), data)

Notes.

- ``model=self`` predicts every trainable parameter of the module. When the module wraps a transformers model
  (``self.model = GPT2LMHeadModel(...)``), pass ``model=self.model`` so that its architecture is detected for the
  neural graph (parameters outside it are then left to the base optimizer alone).
- ``max_train_steps`` feeds the k schedule: use ``self.trainer.estimated_stepping_batches`` (optimizer steps, with
  ``max_steps`` or ``max_epochs``).
- Checkpoints need nothing more: Lightning saves ``optimizer.state_dict()``, which holds NiNo's counter and
  kept snapshots, and restores it on ``fit(ckpt_path=...)``.
- :class:`NiNoLogCallback` logs each NiNo step as ``nino/k``, ``nino/seconds``, ``nino/update_norm`` and
  ``nino/ok`` to every logger of the Trainer, once, at the optimizer step it happened (``LightningModule.log`` from
  a callback would repeat them at every later step), and keeps them in ``trainer.callback_metrics``.
"""

from __future__ import annotations

import torch

from .optim import NiNo

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback as _Base
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback as _Base
    except ImportError:
        _Base = object


def find_nino(trainer) -> NiNo | None:
    """The :class:`NiNo` among the Trainer's optimizers (Lightning wraps each in a ``LightningOptimizer``)."""
    for opt in getattr(trainer, "optimizers", None) or []:
        # a LightningOptimizer passes isinstance checks for the class it wraps, but is not it: unwrap first
        opt = getattr(opt, "_optimizer", opt)
        if isinstance(opt, NiNo):
            return opt
    return None


class NiNoLogCallback(_Base):
    """Log each NiNo step of the Trainer's :class:`NiNo` optimizer (once, at the optimizer step it happened)."""

    def __init__(self):
        if _Base is object:
            raise ImportError("NiNoLogCallback needs lightning: pip install lightning")
        self._logged = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        nino = find_nino(trainer)
        logs = None if nino is None else nino.step_metrics(trainer.global_step)
        if logs is None or nino.last_nino_step is self._logged:
            return
        self._logged = nino.last_nino_step
        # straight to the loggers, once: a value logged with pl_module.log from a callback is logged again at every
        # later step until a new one replaces it; callback_metrics keeps it for monitors and the progress bar
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in logs.items()})
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in logs.items()}, step=trainer.global_step)
