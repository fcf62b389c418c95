"""``NiNo``: a drop-in wrapper around any ``torch.optim`` optimizer that periodically nowcasts the parameters.

    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, ckpt="nino.pt",
               period=1000, max_train_steps=10_000)
    for step in range(10_000):
        opt.zero_grad()
        if opt.need_grads:            # False on the steps NiNo replaces: skip the backward pass
            loss = compute_loss(model)
            loss.backward()
        opt.step()

Schedule (the official wrapper's). With ``ctx`` snapshots (5 for the NiNo checkpoints) and
``interval = period // ctx``: the call with 0-based index ``i`` such that ``(i + 1) % interval == 0`` first
records the parameters as they are when ``step()`` is called (the result of the i previous calls), then

- with fewer than ``ctx`` snapshots kept, runs the base optimizer step as usual;
- with ``ctx`` snapshots kept (every ``period`` calls), runs *no* base step: the parameters are replaced by
  the prediction at horizon ``k(i)`` from the ``ctx`` snapshots, and the snapshots are cleared.

Snapshots are therefore evenly spaced, ``interval`` calls apart, the last one being the parameters the
prediction starts from. Horizons follow :func:`k_schedule`, indexed by ``i // period``.

What NiNo updates. The trainable parameters of ``model``: ``model.named_parameters()`` (shared tensors once,
in registration order) filtered by ``requires_grad``, read when the wrapper is made (or on
:meth:`NiNo.set_model`). The neural graph is built from exactly that ``(name, shape)`` list, with the
architecture detected on the whole module (so a Hugging Face Llama keeps its attention heads). Frozen
parameters are not in the graph, not in the snapshots and never written. Parameter groups of the base
optimizer do not matter (a NiNo step writes parameters, it has no learning rate); a warning is logged when
trainable parameters of ``model`` are missing from the base optimizer.

The base optimizer's state (Adam moments, step counts) is *kept* across NiNo steps, as in the official
wrapper: the base optimizer simply does not step on the calls NiNo replaces, and continues from its moments
afterwards.

Distributed data parallel training (``distributed=True``). Every process holds the same model and parameters
(DDP) and runs the same wrapper: each keeps its own snapshots (identical across processes), and the NiNo step is
split over the processes with :func:`nino_fast.distributed.nowcast_sharded` (each predicts the parameters on its
share of the graph's edges; the result is the same on every process and bitwise that of one process). The
processes then agree on the step's success with one all-reduce before any parameter is written: with
``on_error='skip'`` a failure anywhere (an exception, a NaN, a dead or silent process after ``dist_timeout``
seconds) skips the step on every process alike; with ``'raise'`` every process raises. A failed collective leaves
the wrapper's process group out of step: later NiNo steps then fail at once (skipped or raised), never hang.

Memory. With ``distributed=True`` and a NiNo GNN of the official architecture, each process builds only its
part of the neural graph (:func:`nino_fast.distributed.build_graph_shard`, kept as ``self.graph``: about 1/P of
the edges). Snapshots live on the CPU in one preallocated ``(ctx, n_params)`` buffer, i.e. ``ctx x`` the trainable
parameters (5 x 4 bytes per parameter in float32, half with ``snapshot_dtype=torch.bfloat16``), whatever the
device of the model. Row-major per snapshot so that recording one is a contiguous copy per parameter tensor.
A NiNo step copies the history to (n_params, ctx) rows once; sharded (``distributed=True``), each process copies
only the rows of its part's parameters and computes the scaling statistics from the snapshots one parameter tensor
at a time (:func:`nino_fast.scaling.scale_stats_of_columns`), so the step stays bitwise one process's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from . import plan
from .baselines import Linefit, make_baseline
from .distributed import CommError, GraphShard, build_graph_shard, nowcast_sharded, shard_graph
from .graph import build_graph, detect_arch
from .model import NiNoModel, graph_to
from .scaling import scale_stats_of_columns

logger = logging.getLogger(__name__)

_NONE = (None, "", "none", "None")


def k_schedule(K: int, max_train_steps: int, period: int, p: float = 2.0) -> list[int]:
    """Horizon of each NiNo step, the official schedule: ``round(linspace(K^(1/p), 1, n)^p)``,
    ``n = max(1, max_train_steps // period)`` (long horizons early in training, k = 1 at the end).

    >>> k_schedule(40, 10_000, 1000, 2)
    [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    """
    if K < 1 or period < 1 or max_train_steps < 0 or p <= 0:
        raise ValueError(
            f"k_schedule: need K >= 1, period >= 1, max_train_steps >= 0, p > 0; got K={K}, "
            f"max_train_steps={max_train_steps}, period={period}, p={p}"
        )
    n = max(1, max_train_steps // period)
    # numpy's round (half to even) on float64, as the official code, so the values match it everywhere
    return [int(v) for v in (np.linspace(K ** (1 / p), 1, num=n) ** p).round().astype(np.int64)]


def load_predictor(ckpt, ctx: int | None = None):
    """``ckpt`` (path, NiNoModel, 'linefit', 'linefit+', or any object with ``nowcast/ctx/seq_len``) ->
    predictor; None for 'none'/None. ``ctx`` only sets the baselines' context (default 5)."""
    if isinstance(ckpt, str) and ckpt in _NONE or ckpt is None:
        return None
    if isinstance(ckpt, str) and ckpt.lower().replace("_", "").replace("-", "") in (
        "linefit",
        "linefit+",
        "linefitplus",
    ):
        return make_baseline(ckpt, ctx or 5)
    if isinstance(ckpt, (str, os.PathLike)):
        return NiNoModel.from_checkpoint(ckpt)
    if all(hasattr(ckpt, a) for a in ("nowcast", "ctx", "seq_len")):
        return ckpt
    raise ValueError(
        f"NiNo: ckpt must be a path, a NiNoModel, 'linefit', 'linefit+' or None, got {type(ckpt).__name__}"
    )


class NiNo:
    """NiNo optimizer wrapper (see the module docstring for the schedule and semantics).

    Args:
        base_opt: the optimizer doing the ordinary steps (SGD, Adam, AdamW, ... any param groups).
        model: the module whose trainable parameters NiNo predicts.
        ckpt: NiNo checkpoint path or :class:`NiNoModel` (GNN or WNN+), ``'linefit'`` / ``'linefit+'``
            baselines, or None to run the base optimizer alone (the wrapper is then a pass-through).
        period: calls between NiNo steps (snapshots every ``period // ctx`` calls).
        max_train_steps: the planned number of calls, for the k schedule.
        k_decay: power ``p`` of the k schedule (:func:`k_schedule`).
        ctx: context of the baselines (NiNo checkpoints fix their own).
        snapshot_dtype: ``torch.float32`` (exact) or ``torch.bfloat16`` (half the memory).
        on_error: ``'skip'``: a failed prediction (exception or NaN/Inf) leaves parameters and optimizer state
            untouched, logs a warning, drops the snapshots, and training goes on; ``'raise'``: re-raise it,
            with the wrapper's state as before the call.
        arch, num_heads, num_key_value_heads: override the architecture detection of :func:`build_graph`.
        graph: a prebuilt neural graph of the trainable parameters (skips building one), or with
            ``distributed=True`` this process's part of it (``nino_fast.distributed.build_graph_shard``).
        nino_device: where the prediction runs; default the device of the first trainable parameter.
        backend: kernel backend for :meth:`NiNoModel.nowcast` (None: automatic).
        distributed: split each NiNo step over the processes of ``torch.distributed`` (DDP training: every process
            holds the same parameters; see the module docstring). Needs an initialised process group; a
            ``DistributedDataParallel`` model is unwrapped.
        dist_group: the process group to use (default: a new group of all processes, made here, so that NiNo's
            collectives never interleave with DDP's; gloo when the prediction runs on the CPU).
        dist_timeout: seconds (or a ``timedelta``) after which a process that does not answer makes the others
            fail the step (default: torch.distributed's default timeout). Ignored with ``dist_group``.
    """

    def __init__(
        self,
        base_opt: torch.optim.Optimizer,
        model: torch.nn.Module,
        ckpt=None,
        period: int = 1000,
        max_train_steps: int = 10_000,
        k_decay: float = 2.0,
        ctx: int | None = None,
        snapshot_dtype: torch.dtype = torch.float32,
        on_error: str = "skip",
        arch: str | None = None,
        num_heads: int | None = None,
        num_key_value_heads: int | None = None,
        graph=None,
        nino_device: torch.device | str | None = None,
        backend: str | None = None,
        distributed: bool = False,
        dist_group=None,
        dist_timeout: float | timedelta | None = None,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"NiNo: on_error must be 'skip' or 'raise', got {on_error!r}")
        if snapshot_dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            raise ValueError(f"NiNo: snapshot_dtype must be a floating dtype, got {snapshot_dtype}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"NiNo: model must be an nn.Module, got {type(model).__name__}")
        self.distributed, self._group, self._shard, self._dist_broken = bool(distributed), dist_group, None, None
        if self.distributed:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "NiNo(distributed=True): torch.distributed is not initialised (torchrun + init_process_group)"
                )
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                model = model.module
            if dist_timeout is not None and not isinstance(dist_timeout, timedelta):
                if not dist_timeout > 0:
                    raise ValueError(f"NiNo: dist_timeout must be > 0 seconds, got {dist_timeout!r}")
                dist_timeout = timedelta(seconds=float(dist_timeout))
        self._dist_timeout = dist_timeout
        self.base_opt = base_opt
        self.period, self.max_train_steps, self.k_decay = int(period), int(max_train_steps), float(k_decay)
        self.snapshot_dtype, self.on_error, self.backend = snapshot_dtype, on_error, backend
        self._graph_args = dict(arch=arch, num_heads=num_heads, num_key_value_heads=num_key_value_heads)
        self.predictor = load_predictor(ckpt, ctx)
        self.step_idx = 0
        self.num_snapshots = 0
        # while step() runs: whether this call is a NiNo step (for need_grads inside closures)
        self._running = None
        self.graph = None
        self._snapshots = None
        if self.predictor is None:
            self.ctx = self.interval = 0
            self._k_schedule = []
            self._set_params(model)
            return
        self.ctx = int(self.predictor.ctx)
        if self.period < self.ctx:
            raise ValueError(
                f"NiNo: period ({self.period}) must be >= ctx ({self.ctx}): snapshots are taken every "
                f"period // ctx steps"
            )
        self.interval = self.period // self.ctx
        self._k_schedule = k_schedule(int(self.predictor.seq_len), self.max_train_steps, self.period, self.k_decay)
        self.nino_device = nino_device
        self.set_model(model, graph=graph)

    # ---- set-up --------------------------------------------------------------------------------------------
    def _set_params(self, model: torch.nn.Module) -> None:
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named and self.predictor is not None:
            raise ValueError("NiNo: the model has no trainable parameters (requires_grad=True)")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.num_params = sum(p.numel() for p in self._params)
        in_opt = {id(p) for g in self.base_opt.param_groups for p in g["params"]}
        missing = [n for n, p in named if id(p) not in in_opt]
        if missing and self.predictor is not None:
            logger.warning(
                "NiNo: %d trainable parameters of the model are not in the base optimizer (e.g. %s); "
                "NiNo steps will still overwrite them",
                len(missing),
                missing[0],
            )

    def set_model(self, model: torch.nn.Module, graph=None) -> None:
        """(Re)read the trainable parameters of ``model`` and build their neural graph; drops kept snapshots.
        Call it after changing which parameters are trainable."""
        self._set_params(model)
        if self.predictor is None:
            return
        if isinstance(self.predictor, torch.nn.Module):  # official default: NiNo runs where the model is
            self.predictor.to(self.nino_device or self._params[0].device)
        if graph is None and getattr(self.predictor, "needs_graph", True):
            arch, heads, kv = detect_arch(model)
            args = dict(self._graph_args)
            args["arch"] = args["arch"] or arch
            args["num_heads"] = args["num_heads"] or heads
            args["num_key_value_heads"] = args["num_key_value_heads"] or kv
            t0 = time.perf_counter()
            named = [(n, tuple(p.shape)) for n, p in zip(self._names, self._params, strict=True)]
            if self._sharded():  # this process's part only: the whole graph is never built here
                rank, world = dist.get_rank(self._group), dist.get_world_size(self._group)
                graph = build_graph_shard(named, rank, world, lpe=int(self.predictor.lpe), **args)
            else:
                graph = build_graph(named, lpe=int(self.predictor.lpe), **args)
            logger.info(
                "NiNo: neural graph (%s) of %d parameters built in %.2fs%s",
                args["arch"] or "generic",
                graph.num_params,
                time.perf_counter() - t0,
                f" (this process's part: {graph.local.num_edges} of {graph.num_edges} edges)"
                if isinstance(graph, GraphShard)
                else "",
            )
        if graph is not None:
            if graph.num_params != self.num_params:
                raise ValueError(
                    f"NiNo: the graph has {graph.num_params} parameters, the model has {self.num_params} trainable ones"
                )
            dev = self._predictor_device()
            if dev is not None:  # moved once, not at every NiNo step
                graph = (
                    dataclasses.replace(graph, local=graph_to(graph.local, dev))
                    if isinstance(graph, GraphShard)
                    else graph_to(graph, dev)
                )
        self.graph = graph
        self._snapshots = torch.empty(self.ctx, self.num_params, dtype=self.snapshot_dtype)
        self.num_snapshots = 0
        if self.distributed:
            self._dist_setup()

    def _dist_setup(self) -> None:
        """The wrapper's process group (made once: a collective call, as every process builds the wrapper) and
        this process's shard of the graph."""
        dev = torch.device(self._predictor_device() or self._params[0].device)
        if self._group is None:
            backend = "gloo" if dev.type == "cpu" else dist.get_backend()
            self._group = dist.new_group(backend=backend, timeout=self._dist_timeout)
        self._dist_device = dev
        self._shard = None
        if isinstance(self.predictor, NiNoModel) and self.graph is not None:
            rank, world = dist.get_rank(self._group), dist.get_world_size(self._group)
            if isinstance(self.graph, GraphShard):  # built here (or given) as this process's part
                self._shard = self.graph
            else:
                self._shard = shard_graph(self.graph, rank, world, copy=False)  # views of self.graph

    def _sharded(self) -> bool:
        """Whether NiNo steps run sharded over the processes (distributed, with a NiNo GNN of the official
        architecture): then each process needs only its part of the graph."""
        return self.distributed and isinstance(self.predictor, NiNoModel) and plan.supports(self.predictor)

    def _predictor_device(self):
        if not isinstance(self.predictor, torch.nn.Module):
            return None
        return next(self.predictor.parameters()).device

    # ---- optimizer interface -------------------------------------------------------------------------------
    @property
    def param_groups(self):
        return self.base_opt.param_groups

    @property
    def state(self):
        return self.base_opt.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_opt.zero_grad(set_to_none=set_to_none)

    def get_k(self, step: int | None = None) -> int:
        """The schedule's horizon for 0-based call index ``step`` (default: the current one)."""
        if not self._k_schedule:
            raise ValueError("NiNo.get_k: no NiNo predictor (ckpt=None)")
        step = self.step_idx if step is None else step
        return self._k_schedule[min(len(self._k_schedule) - 1, step // self.period)]

    @property
    def next_step_nino(self) -> bool:
        """True when the next :meth:`step` call is a NiNo step (it runs no base optimizer step)."""
        return (
            self.predictor is not None
            and self.num_snapshots == self.ctx - 1
            and (self.step_idx + 1) % self.interval == 0
        )

    @property
    def need_grads(self) -> bool:
        """False when the next :meth:`step` call is a NiNo step: its gradients would not be used. Inside a
        closure that :meth:`step` is running, it describes that call."""
        if self._running is not None:
            return not self._running
        return not self.next_step_nino

    def step(self, closure: Callable[[], torch.Tensor] | None = None, k: int | None = None):
        """One training step: a base optimizer step, or a NiNo step every ``period`` calls.

        ``closure`` is passed to the base optimizer; on a NiNo step it is called once, before the parameters
        are replaced (``need_grads`` is False inside it), and its loss returned, as ``torch.optim`` optimizers
        do. ``k`` overrides the scheduled horizon of this call if it is a NiNo step. Returns the closure's
        loss or None.
        """
        if self.predictor is None:
            return self._advance(self.base_opt.step(closure))
        is_nino = self.next_step_nino
        self._running = is_nino
        try:
            loss = None
            if is_nino and closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if (self.step_idx + 1) % self.interval == 0:
                self._record()
            if not is_nino:
                return self._advance(self.base_opt.step(closure))
            self._nino_step(self.get_k() if k is None else k)
            return self._advance(loss)
        finally:
            self._running = None

    def after_step(self, k: int | None = None) -> bool:
        """For training loops that always run the base step themselves (e.g. the Hugging Face callback): count
        the step that just finished; every ``period // ctx`` steps record the parameters, and when ``ctx``
        snapshots are in, replace them by the prediction. Returns True if it applied a NiNo step. (Unlike
        :meth:`step`, no base step is saved: the NiNo step comes on top of the step that completed the
        window.)"""
        if self.predictor is None:
            self.step_idx += 1
            return False
        self.step_idx += 1
        if self.step_idx % self.interval:
            return False
        self._record()
        if self.num_snapshots < self.ctx:
            return False
        try:
            return self._nino_step(self.get_k(self.step_idx - 1) if k is None else k, at=self.step_idx)
        except Exception:
            self.step_idx -= 1  # with on_error='raise': as before the call
            raise

    def _advance(self, loss):
        # with accelerate's gradient accumulation, only calls that sync gradients count as steps
        if getattr(self.base_opt, "sync_gradients", True):
            self.step_idx += 1
        return loss

    @torch.no_grad()
    def _record(self) -> None:
        row = self._snapshots[self.num_snapshots]
        off = 0
        for p in self._params:  # one copy per parameter tensor into the preallocated row
            n = p.numel()
            row[off : off + n].copy_(p.detach().reshape(-1))
            off += n
        self.num_snapshots += 1

    def _nino_step(self, k, at: int | None = None) -> bool:
        """Predict from the ``ctx`` snapshots and write the parameters; False if the prediction failed."""
        if isinstance(k, np.integer):
            k = int(k)
        at = self.step_idx + 1 if at is None else at  # 1-based step number, for the log
        t0 = time.perf_counter()
        try:
            # (P, ctx) history, oldest first; bf16 snapshots are widened so that the prediction is float32
            work = torch.float64 if self.snapshot_dtype == torch.float64 else torch.float32
            if self._sharded():  # this process's rows only, with the full history's statistics
                pred = self._predict_sharded(work, k)
            else:
                # (one contiguous copy: a strided view would give nowcast a different summation order)
                states = torch.empty(self.num_params, self.ctx, dtype=work).copy_(self._snapshots.t())
                if self.distributed:
                    pred = self._predict_distributed(states, k)
                else:
                    pred = self.predictor.nowcast(self.graph, states, k, backend=self.backend)
            if pred.shape != (self.num_params,):
                raise ValueError(f"the prediction has shape {tuple(pred.shape)}, expected ({self.num_params},)")
            bad = (~torch.isfinite(pred)).sum().item()
            if bad:
                raise ValueError(f"the prediction has {bad} NaN/Inf values")
            failure = None
        except Exception as exc:
            failure = exc
        if self.distributed:  # every process learns whether all succeeded before any of them writes
            failure = self._agree(failure)
        if failure is not None:
            if self.on_error == "raise":
                self.num_snapshots -= 1  # undo this call's snapshot: the wrapper is as before the call
                raise failure
            logger.warning(
                "NiNo step at step %d (k=%s) failed, parameters left unchanged and snapshots dropped: %s: %s",
                at,
                k,
                type(failure).__name__,
                failure,
            )
            self.num_snapshots = 0
            return False
        with torch.no_grad():
            off = 0
            for p in self._params:  # in place: keeps each parameter's dtype, device and storage
                n = p.numel()
                p.data.copy_(pred[off : off + n].view_as(p))
                off += n
        self.num_snapshots = 0
        logger.info(
            "NiNo step at step %d (k=%d, %s): %.3fs for %d parameters",
            at,
            k,
            type(self.predictor).__name__,
            time.perf_counter() - t0,
            self.num_params,
        )
        return True

    # ---- distributed -------------------------------------------------------------------------------------------
    def _predict_sharded(self, work: torch.dtype, k: int) -> torch.Tensor:
        """The NiNo GNN's step split over the processes, from this process's rows of the snapshots (a (n_own, ctx)
        copy, not the (n_params, ctx) one) and the full snapshots' scaling statistics (computed one parameter
        tensor at a time): bitwise the step of one process."""
        ids = self._shard.shard.ids.long()
        states = torch.empty(ids.numel(), self.ctx, dtype=work).copy_(self._snapshots.t().index_select(0, ids))
        scales = scale_stats_of_columns(
            self._snapshots, self._shard.param_shapes, self.predictor.scale_method, dtype=work
        )
        return self._collective(
            lambda: nowcast_sharded(
                self.predictor, self._shard, states, k, group=self._group, backend=self.backend, scales=scales
            )
        )

    def _predict_distributed(self, states: torch.Tensor, k: int) -> torch.Tensor:
        """A predictor that runs whole: a NiNo model outside the folded plan (WNN+) on rank 0, its result sent to
        all; the baselines (per-parameter and cheap) on every process, on the same snapshots."""
        if isinstance(self.predictor, NiNoModel):
            return self._collective(
                lambda: nowcast_sharded(self.predictor, self._shard, states, k, group=self._group, backend=self.backend)
            )
        return self._collective(lambda: self.predictor.nowcast(self.graph, states, k, backend=self.backend))

    def _collective(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` unless the group failed before; a failed collective marks it broken."""
        if self._dist_broken is not None:
            raise RuntimeError(f"NiNo: the process group failed in an earlier NiNo step ({self._dist_broken})")
        try:
            return run()
        except CommError as exc:
            self._dist_broken = f"{type(exc).__name__}: {exc}"
            raise

    def _agree(self, failure: Exception | None) -> Exception | None:
        """One all-reduce of (failed, step, -step): every process fails the step if any did, or if the processes
        are not at the same step. After a failed collective the group is out of step: no further collective."""
        if self._dist_broken is not None:
            return failure or RuntimeError(f"NiNo: the process group failed ({self._dist_broken})")
        rank, world = dist.get_rank(self._group), dist.get_world_size(self._group)
        flag = torch.tensor(
            [float(failure is not None), self.step_idx, -self.step_idx], dtype=torch.float64, device=self._dist_device
        )
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        except Exception as exc:  # a peer died or timed out between the prediction and here
            self._dist_broken = f"{type(exc).__name__}: {exc}"
            return failure or RuntimeError(
                f"NiNo: rank {rank}/{world}: the processes could not agree on the NiNo step ({exc}); "
                "parameters left unchanged"
            )
        if failure is None and flag[0] > 0:
            return RuntimeError(
                f"NiNo: rank {rank}/{world}: the NiNo step failed on another process; parameters left unchanged"
            )
        if failure is None and flag[1] != -flag[2]:
            return RuntimeError(
                f"NiNo: rank {rank}/{world}: the processes are at different steps ({int(-flag[2])}..{int(flag[1])})"
                "; parameters left unchanged"
            )
        return failure

    # ---- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Base optimizer state, step counter and the kept snapshots (a copy), so that a resumed run continues
        exactly as an uninterrupted one (the official wrapper saves only the base optimizer)."""
        return {
            "base": self.base_opt.state_dict(),
            "step_idx": self.step_idx,
            "num_snapshots": self.num_snapshots,
            "snapshots": None if self._snapshots is None else self._snapshots[: self.num_snapshots].clone(),
            "num_params": self.num_params,
            "ctx": self.ctx,
            "period": self.period,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (snapshots are cast to this wrapper's ``snapshot_dtype``)."""
        for key in ("base", "step_idx", "num_snapshots", "snapshots", "num_params", "ctx"):
            if key not in state:
                raise ValueError(f"NiNo.load_state_dict: missing key {key!r} (not a NiNo state_dict?)")
        if (state["num_params"], state["ctx"]) != (self.num_params, self.ctx):
            raise ValueError(
                f"NiNo.load_state_dict: saved for {state['num_params']} parameters and ctx="
                f"{state['ctx']}, this wrapper has {self.num_params} and ctx={self.ctx}"
            )
        count = int(state["num_snapshots"])
        snaps = state["snapshots"]
        if count and (snaps is None or tuple(snaps.shape) != (count, self.num_params)):
            got = None if snaps is None else tuple(snaps.shape)
            raise ValueError(f"NiNo.load_state_dict: snapshots have shape {got}, expected ({count}, {self.num_params})")
        self.base_opt.load_state_dict(state["base"])
        self.step_idx = int(state["step_idx"])
        if self._snapshots is not None and count:
            self._snapshots[:count].copy_(snaps)
        self.num_snapshots = count if self._snapshots is not None else 0

    def __repr__(self) -> str:
        pred = (
            "none"
            if self.predictor is None
            else (repr(self.predictor) if isinstance(self.predictor, Linefit) else type(self.predictor).__name__)
        )
        return (
            f"NiNo(base_opt={type(self.base_opt).__name__}, predictor={pred}, period={self.period}, "
            f"ctx={self.ctx}, max_train_steps={self.max_train_steps}, params={self.num_params})"
        )
