"""NiNo in Hugging Face ``transformers.Trainer`` (optional dependency: transformers).

Two ways, pick one:

1. The callback: the Trainer keeps its own optimizer and scheduler, NiNo works after its steps::

       from nino_fast.hf import NiNoCallback
       trainer = Trainer(model=model, args=args, train_dataset=ds,
                         callbacks=[NiNoCallback("nino.pt", period=1000)])
       trainer.train()                                      # or train(resume_from_checkpoint=...)

2. The wrapper as the Trainer's optimizer (a NiNo step then *replaces* a base step), with
   :class:`NiNoLogCallback` to see its steps in the logs (its state rides in ``optimizer.pt``)::

       opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, ckpt="nino.pt", period=1000,
                  max_train_steps=args.max_steps)
       trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[NiNoLogCallback()],
                         optimizers=(opt, get_cosine_schedule_with_warmup(opt, 100, args.max_steps)))

Both count *optimizer* steps (after gradient accumulation), never micro-batches.

How the callback works. ``on_step_end`` runs once per optimizer step, after the Trainer's own step: every
``period // ctx`` steps it records the trainable parameters, and when ``ctx`` snapshots are in it replaces them
by the NiNo prediction (:meth:`nino_fast.NiNo.after_step`; unlike the wrapper used as the optimizer, the step
that completes a window still runs its base step). The base optimizer's state and the learning rate schedule
are the Trainer's, untouched. ``max_train_steps`` defaults to the Trainer's ``max_steps``.

Checkpoints. The callback's state (step counter, kept snapshots, a fingerprint of the model) is written to
``nino_state.pt`` inside every checkpoint folder the Trainer writes (``on_save`` runs after the folder is
complete, and after ``save_total_limit`` rotation, so every surviving checkpoint has it). On
``train(resume_from_checkpoint=path)`` it is read back from ``path`` itself, wherever that folder lives: the
callback learns the path from the Trainer call that is running it (below). A missing, unreadable or mismatched
file (other model, other step, corrupt bytes) logs a WARNING and the snapshot window restarts, as in the official
code; it never stops the training. The state is not a transformers "stateful callback": that mechanism stores
JSON in ``trainer_state.json`` (no room for snapshots) and replaces the callback object on resume.

Which Trainer, which checkpoint. Callbacks are not given the Trainer, nor the resume path. The callback takes
them from the Trainer method that is calling it: walking up the call stack from the hook, the first frame
whose ``self`` is a ``transformers.Trainer`` is that Trainer, and its ``train`` frame holds the argument
``resume_from_checkpoint`` (after ``True`` was resolved to the last checkpoint). Only documented names are
relied on (the Trainer class and the argument of ``train``). ``NiNoCallback(..., trainer=t)`` or
``callback.attach(t)`` pins the Trainer (when Trainers are nested, e.g. one evaluating inside another's
callback); the path is still read from that Trainer's ``train`` call.

Logging. Each NiNo step is logged through ``Trainer.log`` as ``nino/k``, ``nino/seconds``, ``nino/update_norm``
(L2 norm of the parameter change) and ``nino/ok`` (0 when the prediction failed and was skipped): it lands in
``trainer.state.log_history`` at the step's ``global_step`` and reaches every reporter (TensorBoard, W&B, ...).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref

import torch

from .optim import NiNo
from .optim.wrapper import STATE_SAVED_ELSEWHERE

logger = logging.getLogger(__name__)

STATE_FILE = "nino_state.pt"
_FORMAT = 1  # version of the file's layout: {"format", "global_step", "nino": NiNo.nino_state_dict()}

try:  # the base class only matters to transformers' own type checks; without transformers, stay importable
    from transformers import Trainer as _Trainer
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base, _Trainer = object, None


# ---- the Trainer and its resume path, from the call stack -----------------------------------------------------
def _trainer_frames(trainer=None, max_depth: int = 64):
    """Frames (innermost first) of Trainer methods on the current call stack; of ``trainer`` only, if given."""
    frame = sys._getframe(1)
    try:
        for _ in range(max_depth):
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if _Trainer is not None and isinstance(owner, _Trainer) and (trainer is None or owner is trainer):
                yield frame
            frame = frame.f_back
    finally:
        del frame  # frames reference their locals: do not keep the stack alive


def find_trainer():
    """The ``transformers.Trainer`` whose method is running the current callback hook, or None."""
    for frame in _trainer_frames():
        return frame.f_locals["self"]
    return None


def find_resume_checkpoint(trainer=None) -> tuple[bool, str | None]:
    """``(found, path)``: the ``resume_from_checkpoint`` that the running ``Trainer.train`` call resolved (None when
    not resuming). ``found`` is False when no Trainer frame on the stack holds that argument."""
    for frame in _trainer_frames(trainer):
        if "resume_from_checkpoint" not in frame.f_locals:
            continue
        path = frame.f_locals["resume_from_checkpoint"]
        if path is True:  # train(resume_from_checkpoint=True) not yet resolved: the Trainer's own rule
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(frame.f_locals["self"].args.output_dir)
        return True, (None if path in (None, False) else os.fspath(path))
    return False, None


def unwrap_nino(optimizer) -> NiNo | None:
    """The :class:`NiNo` inside the Trainer's optimizer (accelerate wraps it in ``AcceleratedOptimizer``)."""
    for _ in range(4):
        if isinstance(optimizer, NiNo):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


# ---- shared by both callbacks ----------------------------------------------------------------------------------
class _TrainerLink(_Base):
    """Finds the Trainer running the callback (or uses the one given) and logs NiNo steps through ``Trainer.log``."""

    def __init__(self, trainer=None):
        if _Base is object:
            raise ImportError(f"{type(self).__name__} needs transformers: pip install transformers")
        self._trainer_ref = None
        self._logged = None  # the last ``last_nino_step`` logged: each attempt once
        self._warned_no_trainer = False
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer):
        """Pin ``trainer`` (kept by weak reference) and add this callback to it if it is not there yet. Returns
        the trainer."""
        if _Trainer is not None and not isinstance(trainer, _Trainer):
            raise TypeError(f"{type(self).__name__}.attach: expected a transformers.Trainer, got {type(trainer)}")
        self._trainer_ref = weakref.ref(trainer)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return trainer

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_trainer_ref"] = None  # a weak reference cannot be pickled (Ray Tune, Optuna pickle trainers)
        return state

    @property
    def trainer(self):
        """The pinned Trainer, or the one running the current hook (None outside a Trainer)."""
        pinned = None if self._trainer_ref is None else self._trainer_ref()
        return pinned if pinned is not None else find_trainer()

    def _log_nino_step(self, nino: NiNo, state) -> None:
        """Send the wrapper's last NiNo step attempt to ``Trainer.log`` if it happened at this optimizer step."""
        logs = nino.step_metrics(state.global_step)
        if logs is None or nino.last_nino_step is self._logged:
            return
        self._logged = nino.last_nino_step
        trainer = self.trainer
        if trainer is not None:
            trainer.log(logs)
            return
        if not self._warned_no_trainer:  # driven outside a Trainer: keep the record, say why reporters miss it
            logger.warning(
                "%s: no transformers.Trainer found on the call stack; NiNo steps go to state.log_history only "
                "(pass trainer= or call attach(trainer) to log them through Trainer.log)",
                type(self).__name__,
            )
            self._warned_no_trainer = True
        state.log_history.append({**logs, "step": state.global_step})


class NiNoLogCallback(_TrainerLink):
    """Log the NiNo steps of a :class:`NiNo` used as the Trainer's optimizer (``optimizers=(NiNo(...), sched)``)
    through ``Trainer.log``. Its state needs no callback: it is part of the optimizer's ``state_dict``."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        nino = unwrap_nino(optimizer)
        if nino is not None:
            self._log_nino_step(nino, state)
        return control


class NiNoCallback(_TrainerLink):
    """Apply NiNo steps inside ``transformers.Trainer`` (see the module docstring).

    Args:
        ckpt: NiNo checkpoint path, a :class:`~nino_fast.NiNoModel`, ``'linefit'`` or ``'linefit+'``.
        period: optimizer steps between NiNo steps.
        max_train_steps: for the k schedule; default the Trainer's ``state.max_steps``.
        trainer: pin the Trainer (optional; default: the one running the hooks, see the module docstring).
        **nino_kwargs: passed to :class:`nino_fast.NiNo` (``k_decay``, ``snapshot_dtype``, ``on_error``, ...).
    """

    def __init__(self, ckpt, period: int = 1000, max_train_steps: int | None = None, trainer=None, **nino_kwargs):
        super().__init__(trainer)
        self.ckpt, self.period, self.max_train_steps, self.kwargs = ckpt, period, max_train_steps, nino_kwargs
        self.nino: NiNo | None = None

    # ---- hooks --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("NiNoCallback: the Trainer passed no model/optimizer to on_train_begin")
        if unwrap_nino(optimizer) is not None:
            raise ValueError(
                "NiNoCallback: the Trainer's optimizer is already a NiNo wrapper; use one or the other (with "
                "optimizers=(NiNo(...), scheduler), add NiNoLogCallback() for the logs)"
            )
        steps = self.max_train_steps or state.max_steps
        saved_here = STATE_SAVED_ELSEWHERE.set(True)  # nino_state.pt in every checkpoint: no Accelerate advice
        try:
            self.nino = NiNo(
                optimizer, model=model, ckpt=self.ckpt, period=self.period, max_train_steps=steps, **self.kwargs
            )
        finally:
            STATE_SAVED_ELSEWHERE.reset(saved_here)
        self._logged = None
        self.nino.step_idx = state.global_step
        if state.global_step:
            self._restore(args, state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.nino is not None:
            self.nino.after_step()
            self._log_nino_step(self.nino, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.nino is None or not getattr(args, "should_save", state.is_world_process_zero):
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning(
                "NiNoCallback: checkpoint folder %s not found; NiNo's state is not saved with this checkpoint "
                "(resuming from it restarts the snapshot window)",
                folder,
            )
            return control
        self.save_state(os.path.join(folder, STATE_FILE), state.global_step)
        return control

    # ---- state ----------------------------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike, global_step: int) -> None:
        """Write NiNo's state for a checkpoint at ``global_step`` (atomically: a crash never leaves half a file)."""
        tmp = f"{os.fspath(path)}.tmp"
        torch.save({"format": _FORMAT, "global_step": int(global_step), "nino": self.nino.nino_state_dict()}, tmp)
        os.replace(tmp, path)

    def load_state(self, path: str | os.PathLike, global_step: int) -> None:
        """Restore the state :meth:`save_state` wrote at ``global_step``; raises ValueError (or the loader's error)
        if it does not fit, leaving the wrapper as it was."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT or "nino" not in saved:
            raise ValueError("not a NiNoCallback state file")
        if saved.get("global_step") != global_step:
            raise ValueError(f"saved at step {saved.get('global_step')}, resuming at step {global_step}")
        self.nino.load_nino_state_dict(saved["nino"])
        if self.nino.step_idx != global_step:  # a consistent file says the same twice; anything else is corrupt
            raise ValueError(f"its step counter is {self.nino.step_idx}, resuming at step {global_step}")

    def _restore(self, args, state) -> None:
        """On resume: the state from the checkpoint folder being resumed from; else a WARNING and a fresh
        window."""
        found, folder = find_resume_checkpoint(None if self._trainer_ref is None else self._trainer_ref())
        if not found:  # not called by a Trainer (or a very different one): the Trainer's default folder
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            logger.warning(
                "NiNoCallback: resuming at step %d but the checkpoint path is unknown (no Trainer.train call on the "
                "stack); trying %s",
                state.global_step,
                folder,
            )
        path = None if folder is None else os.path.join(folder, STATE_FILE)
        if path is None or not os.path.isfile(path):
            logger.warning(
                "NiNoCallback: no NiNo state %s in the checkpoint resumed at step %d; the snapshot window restarts",
                STATE_FILE if folder is None else path,
                state.global_step,
            )
            return
        try:
            self.load_state(path, state.global_step)
        except Exception as exc:  # corrupt or foreign: training goes on as after an official-code resume
            self.nino.num_snapshots, self.nino.step_idx = 0, state.global_step
            logger.warning(
                "NiNoCallback: cannot restore NiNo's state from %s (%s: %s); the snapshot window restarts",
                path,
                type(exc).__name__,
                exc,
            )
            return
        logger.info(
            "NiNoCallback: restored NiNo's state from %s (step %d, %d snapshots)",
            path,
            self.nino.step_idx,
            self.nino.num_snapshots,
        )
