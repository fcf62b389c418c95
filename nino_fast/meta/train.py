"""``nino-fast train``: meta-train a NiNoModel (the GNN, or the WNN+ MLP) on a trajectory store.

    nino-fast train --data STORE --out nino_fast_small.pt [--arch nino|wnn] [--hid 64] [--steps 2000]
                    [--max-minutes 25]

The official recipe (``train_nino.py`` of SamsungSAILMontreal/nino), on our data and our fused ops:

- batches of ``batch`` trajectories x ``samples_per_traj`` windows (:mod:`nino_fast.meta.data`), one
  disconnected graph;
- loss: mean L1 error of the scaled parameter deltas over parameters and horizons k = 1..K (direct
  multi-step forecasting: one forward pass predicts all K horizons);
- AdamW (lr 3e-3, weight decay 1e-2), cosine decay to 1e-6 over ``steps``, gradient norm clipped at 5;
- the forward of :mod:`nino_fast.meta.forward` (``folded`` by default: fused kernels forward, analytic backward,
  itself fused kernels on float32 CPU tensors: :mod:`nino_fast.ops.backward`).

``arch='wnn'`` fits the WNN+ MLP (``NiNoModel(gnn=False)``, the official ``nino_mlp.pt`` architecture: each
parameter's own scaled history and edge type through a 4-layer MLP) on the same windows, loss, optimizer,
schedule, clipping, NaN safety and resumption; it needs no graph message passing (``path``/``backend`` do not
apply) and no Laplacian encoding.

NaN safety (the official run needs an outer restart loop; this one does not): a step whose loss or gradient
norm is not finite is skipped (counted, no parameter update); if the parameters become non-finite after an
update, the model, optimizer and schedule are restored from the last good state (kept in memory at every
checkpoint) and training goes on with the next batches.

Resumable: every ``ckpt_every`` steps (and when stopping early: ``max_minutes`` of CPU time, or ``stop_at``)
the full state — model, optimizer, schedule, the sampler's random generator, losses, CPU time — is written
atomically to ``<out>.state.pt``; rerunning the same command continues from it, and the result equals an
uninterrupted run (same threads, same backend). ``<out>`` itself is written in the format
:meth:`NiNoModel.from_checkpoint` loads (``state_dict`` + ``model_args``, plus ``train_info``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._env import torch_threads
from ..model import NiNoModel
from .data import WindowSampler
from .forward import PATHS, check_trainable, loss_fn, predict_pieces, predict_wnn, wnn_loss

ARCHS = ("nino", "wnn")


@dataclass
class TrainConfig:
    data: str
    out: str
    hid: int = 64
    steps: int = 2000
    batch: int = 4
    samples_per_traj: int = 4
    lr: float = 3e-3
    wd: float = 1e-2
    eta_min: float = 1e-6
    grad_clip: float = 5.0
    stride_steps: int = 40
    ctx: int = 5
    seq_len: int = 40
    lpe: int = 8
    max_feat_size: int = 9
    seed: int = 0
    path: str = "folded"
    backend: str | None = None
    ckpt_every: int = 50
    log_every: int = 25
    max_minutes: float | None = None  # CPU minutes over all invocations
    stop_at: int | None = None  # stop (resumably) once this many steps are done
    threads: int = 1
    max_restores: int = 20
    init: str = "official"  # 'official' (normal, std 0.02) or 'torch' (PyTorch's Linear init, zero last head layer)
    arch: str = "nino"  # 'nino' (the GNN) or 'wnn' (the WNN+ per-parameter MLP)
    init_from: str | None = None  # start from this checkpoint's weights (same architecture) instead of ``init``
    wte_pos_enc: bool = False  # the paper's embedding of word-embedding rows by token position (GNN only)
    vocab_size: int = 50257  # positions the wte_pos_enc embedding covers (the official checkpoints': GPT-2's)
    max_params: int | None = None  # train only on the store's runs of models with at most this many parameters

    def model_args(self) -> dict:
        """The checkpoint's ``model_args`` (what :meth:`NiNoModel.from_checkpoint` builds)."""
        if self.arch == "wnn":
            return dict(
                gnn=False,
                ctx=self.ctx,
                hid=self.hid,
                seq_len=self.seq_len,
                max_feat_size=self.max_feat_size,
                scale_method="std",
            )
        return dict(
            ctx=self.ctx,
            hid=self.hid,
            seq_len=self.seq_len,
            lpe=self.lpe,
            max_feat_size=self.max_feat_size,
            wte_pos_enc=self.wte_pos_enc,
            vocab_size=self.vocab_size,
            scale_method="std",
        )


def _torch_init(model) -> None:
    """PyTorch's default Linear initialisation (uniform, +-1/sqrt(fan_in)) for every linear layer, and a zero
    last head layer, so that training starts from "no change" with signal flowing through all layers (the
    official std-0.02 init shrinks it ~6x per layer)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    last = model.edge_mlp.fc[-1] if model.is_mlp else model.edge_out.fc[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]):
        if cfg.path not in PATHS:
            raise ValueError(f"train: path must be one of {PATHS}, got {cfg.path!r}")
        if cfg.arch not in ARCHS:
            raise ValueError(f"train: arch must be one of {ARCHS}, got {cfg.arch!r}")
        if cfg.wte_pos_enc and cfg.arch == "wnn":
            raise ValueError("train: wte_pos_enc is a node feature of the GNN; WNN+ (arch='wnn') has no nodes")
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.state_path = self.out.with_name(self.out.name + ".state.pt")
        torch.manual_seed(cfg.seed)
        self.model = NiNoModel(**cfg.model_args()).train()
        check_trainable(self.model)
        if cfg.init == "torch":
            _torch_init(self.model)
        elif cfg.init != "official":  # official: NiNoModel's own (std 0.02 for the GNN, PyTorch's for WNN+)
            raise ValueError(f"train: init must be 'official' or 'torch', got {cfg.init!r}")
        self.parent_info = None
        if cfg.init_from:
            self._warm_start(cfg.init_from)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps, eta_min=cfg.eta_min)
        lpe = 0 if cfg.arch == "wnn" else cfg.lpe
        self.sampler = WindowSampler(
            cfg.data,
            cfg.ctx,
            cfg.seq_len,
            cfg.stride_steps,
            cfg.samples_per_traj,
            lpe,
            seed=cfg.seed,
            max_params=cfg.max_params,
        )
        self.step, self.losses, self.skipped, self.restores = 0, [], 0, 0
        self.cpu_seconds, self.graphs = 0.0, 0
        if self.state_path.is_file():
            st = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self._check_same_run(st.get("config", {}))
            self._load(st)
            log(f"train: resumed from {self.state_path} at step {self.step}")
        self.good = self._state()

    # what may change between a run and its continuation: where things are, when to stop, how fast to run
    _RESUMABLE_CHANGES = (
        "data",
        "out",
        "init_from",
        "ckpt_every",
        "log_every",
        "stop_at",
        "max_minutes",
        "threads",
        "backend",
        "path",
    )

    def _check_same_run(self, saved: dict) -> None:
        """A state continues only the run it was saved by: every option that shapes the result (steps and hence
        the schedule, lr, batch, seed, ...) as it was."""
        now = dataclasses.asdict(self.cfg)
        saved = {"arch": "nino", **saved}  # (states saved before the other options were kept)
        changed = [k for k in now if k not in self._RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
        if changed:
            said = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed)
            raise ValueError(
                f"train: {self.state_path} continues a run with {said}; rerun with the same options, or use another "
                "--out or delete the state file to start over"
            )

    def _warm_start(self, path: str) -> None:
        """Copy the weights of checkpoint ``path`` (fine-tuning; the optimizer and schedule start fresh). A
        checkpoint without ``wte_pos_enc`` can start a model with it: the position embedding starts at zero, so
        the warm-started model predicts exactly what ``path`` does."""
        src = NiNoModel.from_checkpoint(path)
        own = self.model.state_dict()
        theirs = src.state_dict()
        pos = "wte_pos_enc_layer.weight"
        if pos in own and pos not in theirs:
            theirs[pos] = torch.zeros_like(own[pos])
        if (
            src.is_mlp != self.model.is_mlp
            or set(theirs) != set(own)
            or any(theirs[k].shape != v.shape for k, v in own.items())
        ):
            raise ValueError(
                f"train: init_from={path} is not a checkpoint of this architecture (arch={self.cfg.arch!r}, "
                f"model_args={self.cfg.model_args()})"
            )
        self.model.load_state_dict(theirs)
        # provenance: the starting checkpoint's own training record travels with the fine-tuned one
        self.parent_info = dict(path=str(path), train_info=src.train_info)

    # ---- state --------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return copy.deepcopy(
            dict(
                model=self.model.state_dict(),
                opt=self.opt.state_dict(),
                sched=self.sched.state_dict(),
                step=self.step,
            )
        )

    def _full_state(self) -> dict:
        return dict(
            **self._state(),
            gen=self.sampler.gen.get_state(),
            losses=list(self.losses),
            skipped=self.skipped,
            restores=self.restores,
            cpu_seconds=self.cpu_seconds,
            graphs=self.graphs,
            config=dataclasses.asdict(self.cfg),
        )

    def _restore(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step = st["step"]

    def _load(self, st: dict) -> None:
        self._restore(st)
        self.sampler.gen.set_state(st["gen"])
        self.losses, self.skipped, self.restores = list(st["losses"]), st["skipped"], st["restores"]
        self.cpu_seconds, self.graphs = st["cpu_seconds"], st["graphs"]

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(self._full_state(), self.state_path)
        info = dict(
            steps_done=self.step,
            steps_planned=self.cfg.steps,
            final_loss=float(sum(self.losses[-50:]) / max(1, len(self.losses[-50:]))),
            skipped_steps=self.skipped,
            restores=self.restores,
            cpu_seconds=round(self.cpu_seconds, 1),
            graphs_seen=self.graphs,
            data=str(self.cfg.data),
            runs=len(self.sampler.runs),
            config={k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("data", "out")},
        )
        if self.parent_info is not None:
            info["init_from"] = self.parent_info
        ckpt = dict(state_dict=self.model.state_dict(), model_args=self.cfg.model_args(), train_info=info)
        _atomic_save(ckpt, self.out)

    # ---- one step -----------------------------------------------------------------------------------------
    def loss(self, b) -> torch.Tensor:
        """The paper's loss on batch ``b`` (a Batch for the GNN, a ParamBatch for WNN+)."""
        if self.cfg.arch == "wnn":
            return wnn_loss(predict_wnn(self.model, b), b)
        return loss_fn(predict_pieces(self.model, b, self.cfg.path, self.cfg.backend), b)

    def train_step(self, hook) -> float | None:
        cfg = self.cfg
        b = self.sampler.sample_params(cfg.batch) if cfg.arch == "wnn" else self.sampler.sample(cfg.batch)
        if hook:
            hook("batch", self, b)
        loss = self.loss(b)
        self.graphs += b.num_graphs
        self.step += 1
        ok = bool(torch.isfinite(loss))
        if ok:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if hook:
                hook("grad", self, b)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            ok = bool(torch.isfinite(norm))
        if not ok:
            self.skipped += 1
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()  # the schedule follows the step count, updated or not
            self.log(f"train: step {self.step}: non-finite loss or gradient, step skipped ({self.skipped} so far)")
            return None
        self.opt.step()
        self.sched.step()
        if hook:
            hook("update", self, b)
        if not _finite(self.model.parameters()):
            self.restores += 1
            if self.restores > self.cfg.max_restores:
                raise RuntimeError(f"train: parameters went non-finite {self.restores} times; giving up")
            self.log(f"train: step {self.step}: non-finite parameters, restored the state of step {self.good['step']}")
            self._restore(copy.deepcopy(self.good))
            return None
        value = loss.item()
        self.losses.append(value)
        return value

    def run(self, hook=None) -> dict:
        cfg = self.cfg
        c0, t0, last_log = time.process_time(), time.perf_counter(), self.step
        cpu_base, graphs0 = self.cpu_seconds, self.graphs
        while self.step < cfg.steps:
            if cfg.stop_at is not None and self.step >= cfg.stop_at:
                break
            if cfg.max_minutes is not None and self.cpu_seconds >= 60 * cfg.max_minutes:
                self.log(f"train: CPU budget of {cfg.max_minutes:g} min reached at step {self.step}")
                break
            self.train_step(hook)
            self.cpu_seconds = cpu_base + time.process_time() - c0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                if _finite(self.model.parameters()):
                    self.good = self._state()
                self.save()
            if self.step - last_log >= cfg.log_every:
                recent = self.losses[-(self.step - last_log) :]
                wall = time.perf_counter() - t0
                self.log(
                    f"train: step {self.step}/{cfg.steps} loss {sum(recent) / max(1, len(recent)):.4f} "
                    f"lr {self.sched.get_last_lr()[0]:.2e} {(self.graphs - graphs0) / wall:.1f} graphs/s "
                    f"cpu {self.cpu_seconds / 60:.1f} min"
                )
                last_log = self.step
        self.save()
        return dict(
            step=self.step,
            losses=list(self.losses),
            skipped=self.skipped,
            restores=self.restores,
            cpu_seconds=self.cpu_seconds,
            graphs=self.graphs,
            out=str(self.out),
        )


def train(cfg: TrainConfig, log: Callable[[str], None] = print, hook=None) -> dict:
    """Run (or continue) meta-training as configured; returns a summary (losses, counts, CPU seconds).

    ``hook(stage, trainer, batch)`` (stage 'batch', 'grad' or 'update') lets tests inject faults.
    """
    if not math.isfinite(cfg.lr) or cfg.steps < 1:
        raise ValueError(f"train: need a finite lr and steps >= 1, got lr={cfg.lr}, steps={cfg.steps}")
    with torch_threads(cfg.threads):  # the caller's thread count is restored after
        trainer = _Trainer(cfg, log)
        name = f"WNN+ MLP(hid={cfg.hid})" if cfg.arch == "wnn" else f"NiNoModel(hid={cfg.hid}), path {cfg.path}"
        log(
            f"train: {name} {sum(p.numel() for p in trainer.model.parameters())} parameters, "
            f"{len(trainer.sampler.runs)} runs in {cfg.data}, {cfg.steps} steps of "
            f"{cfg.batch}x{cfg.samples_per_traj} graphs"
        )
        return trainer.run(hook)
