"""NiNo in Hugging Face ``transformers.Trainer``: a ``TrainerCallback`` (optional dependency: transformers).

    from nino_fast.hf import NiNoCallback
    callback = NiNoCallback("nino.pt", period=1000)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()

The Trainer owns the optimizer step, so the callback works after it (``on_step_end``, once per optimizer step,
after gradient accumulation): every ``period // ctx`` optimizer steps it records the trainable parameters, and
when ``ctx`` snapshots are in it replaces them by the NiNo prediction (:meth:`nino_fast.NiNo.after_step`). The
one difference with :class:`nino_fast.NiNo` used as the optimizer: the step that completes a window still runs
its forward/backward and base step (one step in ``period`` is not saved). The base optimizer's state and the
learning rate schedule are left to the Trainer, untouched. ``max_train_steps`` defaults to the Trainer's
``max_steps``.

Checkpoints: on every save the callback writes its state (step, kept snapshots) to ``nino_state.pt`` in the
checkpoint folder, and on ``train(resume_from_checkpoint=...)`` reads it back from
``checkpoint-<global_step>`` under ``output_dir`` when present (otherwise the snapshot window restarts, as in
the official code).
"""

from __future__ import annotations

import logging
import os

import torch

from .optim import NiNo

logger = logging.getLogger(__name__)

STATE_FILE = "nino_state.pt"

try:  # the base class only matters to transformers' own type checks; without transformers, stay importable
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base = object


class NiNoCallback(_Base):
    """Apply NiNo steps inside ``transformers.Trainer`` (see the module docstring).

    Args:
        ckpt: NiNo checkpoint path, a :class:`~nino_fast.NiNoModel`, ``'linefit'`` or ``'linefit+'``.
        period: optimizer steps between NiNo steps.
        max_train_steps: for the k schedule; default the Trainer's ``state.max_steps``.
        **nino_kwargs: passed to :class:`nino_fast.NiNo` (``k_decay``, ``snapshot_dtype``, ``on_error``, ...).
    """

    def __init__(self, ckpt, period: int = 1000, max_train_steps: int | None = None, **nino_kwargs):
        if _Base is object:
            raise ImportError("NiNoCallback needs transformers: pip install transformers")
        self.ckpt, self.period, self.max_train_steps, self.kwargs = ckpt, period, max_train_steps, nino_kwargs
        self.nino: NiNo | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("NiNoCallback: the Trainer passed no model/optimizer to on_train_begin")
        steps = self.max_train_steps or state.max_steps
        self.nino = NiNo(
            optimizer, model=model, ckpt=self.ckpt, period=self.period, max_train_steps=steps, **self.kwargs
        )
        self.nino.step_idx = state.global_step
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step and os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            count = int(saved["num_snapshots"])
            if saved["num_params"] == self.nino.num_params and count < self.nino.ctx:
                self.nino.step_idx = int(saved["step_idx"])
                self.nino._snapshots[:count].copy_(saved["snapshots"])
                self.nino.num_snapshots = count
            else:
                logger.warning("NiNoCallback: %s does not match this model; the snapshot window restarts", path)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.nino is not None:
            self.nino.after_step()
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.nino is None or not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            n = self.nino.num_snapshots
            torch.save(
                {
                    "step_idx": self.nino.step_idx,
                    "num_snapshots": n,
                    "num_params": self.nino.num_params,
                    "snapshots": self.nino._snapshots[:n].clone(),
                },
                os.path.join(folder, STATE_FILE),
            )
        return control
