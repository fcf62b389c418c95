"""``NiNo``: a ``torch.optim.Optimizer`` around any optimizer that periodically nowcasts the parameters.

    opt = NiNo(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, ckpt="nino.pt",
               period=1000, max_train_steps=10_000)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)   # schedulers take the wrapper
    for step in range(10_000):
        opt.zero_grad()
        if opt.need_grads:            # False on the steps NiNo replaces: skip the backward pass
            loss = compute_loss(model)
            loss.backward()
        opt.step()
        sched.step()

A real optimizer. ``NiNo`` is a :class:`torch.optim.Optimizer` that *shares* the base optimizer's ``param_groups``
(the same list and dicts: a scheduler on the wrapper sets the base's learning rates), ``state`` and ``defaults``;
``add_param_group``, ``zero_grad``, step pre/post hooks, state-dict hooks and torch's ``state_dict`` format
(``state`` and ``param_groups`` of the base, plus a ``"nino"`` entry) work as on any optimizer, so
``torch.optim.lr_scheduler``, transformers' schedulers and ``Trainer(optimizers=(opt, sched))``, Accelerate's
``prepare`` and Lightning's ``configure_optimizers`` take it. Each call of :meth:`NiNo.step` is one optimizer step
for the schedulers, NiNo steps included.

Schedule (the official wrapper's). With ``ctx`` snapshots (5 for the NiNo checkpoints) and
``interval = period // ctx`` (``period`` must be a multiple of ``ctx``): the counted call with 0-based index ``i``
such that ``(i + 1) % interval == 0`` first records the parameters as they are when ``step()`` is called (the
result of the i previous calls), then

- with fewer than ``ctx`` snapshots kept, runs the base optimizer step as usual;
- with ``ctx`` snapshots kept (every ``period`` calls), runs *no* base step: the parameters are replaced by
  the prediction at horizon ``k(i)`` from the ``ctx`` snapshots, and the snapshots are cleared.

Snapshots are evenly spaced, ``interval`` calls apart, the last one being the parameters the prediction starts
from. Horizons follow :func:`k_schedule`, indexed by ``i // period``.

Counted calls. Only optimizer steps count, never micro-batches: a loop that calls ``step()`` every N
micro-batches counts its calls; when the base optimizer is Accelerate's ``AcceleratedOptimizer`` (``NiNo(
accelerator.prepare(base))``), calls during gradient accumulation (``sync_gradients`` False) are passed to it and
not counted; ``accelerator.prepare(NiNo(base))``, the Hugging Face Trainer and Lightning call ``step()`` only on
accumulation boundaries.

What NiNo updates. The parameters that the base optimizer holds and that are trainable (``requires_grad``), named
as in the user's module: ``model`` is unwrapped first (``torch.compile``, DDP / DataParallel, PEFT; see
:func:`nino_fast.wrapped.unwrap_model`) so that its architecture is detected (a Hugging Face Llama keeps its
attention heads). The neural graph is built from that ``(name, shape)`` list. The set is re-read at the start of
every snapshot window: parameters added with :meth:`add_param_group` join the graph there, parameters frozen
since leave it; a parameter frozen in the middle of a window is never written. Trainable parameters of ``model``
that the base optimizer does not hold are left alone (a warning names them). Parameter groups do not matter
otherwise (a NiNo step writes parameters, it has no learning rate).

The base optimizer's state (Adam moments, step counts) is *kept* across NiNo steps, as in the official
wrapper: the base optimizer simply does not step on the calls NiNo replaces, and continues from its moments
afterwards.

All or nothing. A call of :meth:`step` that raises anything (a failed prediction with ``on_error='raise'``, an
exception of the base optimizer, ``KeyboardInterrupt``) leaves the wrapper's counters and snapshots as before the
call, and the parameters are written all at once (Ctrl-C is held back while they are written); a failed prediction
with ``on_error='skip'`` (the default) leaves parameters and the base optimizer untouched, logs a WARNING and drops
the snapshots. :meth:`load_state_dict` checks everything (types, ranges, shapes, the model's fingerprint) before
changing anything.

Mixed precision. The loop above with ``torch.amp.GradScaler`` (``scaler.scale(loss).backward()`` under
``need_grads``, then ``scaler.step(opt)`` and ``scaler.update()``) works unchanged: on a call that NiNo replaces,
:meth:`zero_grad` leaves a zero gradient on one parameter, so that the scaler records its (empty) inf check and
calls ``step()``; the NiNo step ignores gradients.

Distributed data parallel training (``distributed=True``). Every process holds the same model and parameters
(DDP) and runs the same wrapper: each keeps its own snapshots (identical across processes), and the NiNo step is
split over the processes with :func:`nino_fast.distributed.nowcast_sharded` (each predicts the parameters on its
share of the graph's edges; the result is the same on every process and bitwise that of one process at the same
torch thread count). The processes then agree on the step's
success with one all-reduce before any parameter is written: with ``on_error='skip'`` a failure anywhere (an
exception, a NaN, a dead or silent process after ``dist_timeout`` seconds) skips the step on every process alike;
with ``'raise'`` every process raises. A failed collective leaves the wrapper's process group out of step: later
NiNo steps then fail at once (skipped or raised), never hang.

Memory. With ``distributed=True`` and a NiNo GNN of the official architecture, each process builds only its
part of the neural graph (:func:`nino_fast.distributed.build_graph_shard`, kept as ``self.graph``: about 1/P of
the edges). Snapshots live on the CPU in one preallocated ``(ctx, n_params)`` buffer, i.e. ``ctx x`` the trainable
parameters (5 x 4 bytes per parameter in float32, half with ``snapshot_dtype=torch.bfloat16``), whatever the
device of the model. Row-major per snapshot so that recording one is a contiguous copy per parameter tensor.
A NiNo step copies the history to (n_params, ctx) rows once; sharded (``distributed=True``), each process copies
only the rows of its part's parameters and computes the scaling statistics from the snapshots one parameter tensor
at a time (:func:`nino_fast.scaling.scale_stats_of_columns`), so the step stays bitwise that of one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from . import plan
from .baselines import Linefit, make_baseline
from .distributed import CommError, GraphShard, build_graph_shard, nowcast_sharded, shard_graph
from .graph import build_graph, detect_arch, fingerprint
from .model import NiNoModel, graph_to
from .scaling import scale_stats_of_columns
from .wrapped import unwrap_model

logger = logging.getLogger(__name__)

_NONE = ("", "none", "None")
_BUNDLED_SAID = False


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
    predictor; None for 'none' / None / False. ``ctx`` only sets the baselines' context (default 5)."""
    if ckpt is None or ckpt is False or isinstance(ckpt, str) and ckpt in _NONE:
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
        f"NiNo: ckpt must be a path, a NiNoModel, 'linefit', 'linefit+' or 'none', got {type(ckpt).__name__}"
    )


def _default_ckpt():
    """The checkpoint shipped with the package, announced once per process at INFO (never a silent default)."""
    from .checkpoints import SMALL

    global _BUNDLED_SAID
    if not _BUNDLED_SAID:
        logger.info("NiNo: no ckpt given, using the bundled checkpoint %s (ckpt='none' runs the base optimizer)", SMALL)
        _BUNDLED_SAID = True
    return SMALL


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"NiNo: {name} must be an int >= {low}, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C back while the block runs (re-delivered after it): the parameters are written all or none.
    Only the main thread receives signals, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


class NiNo(torch.optim.Optimizer):
    """NiNo optimizer wrapper (see the module docstring for the schedule and semantics).

    Args:
        base_opt: the optimizer doing the ordinary steps (SGD, Adam, AdamW, ... any param groups).
        model: the module whose parameters NiNo predicts (wrappers such as ``torch.compile`` or DDP are seen
            through).
        ckpt: NiNo checkpoint path or :class:`NiNoModel` (GNN or WNN+), ``'linefit'`` / ``'linefit+'``
            baselines; None (the default): the bundled checkpoint (:data:`nino_fast.checkpoints.SMALL`, said at
            INFO); ``'none'``: no NiNo steps (the wrapper is then a pass-through to the base optimizer).
        period: counted calls between NiNo steps, a multiple of ``ctx`` (snapshots every ``period // ctx``).
        max_train_steps: the planned number of counted calls, for the k schedule.
        k_decay: power ``p`` of the k schedule (:func:`k_schedule`).
        ctx: context of the baselines (NiNo checkpoints fix their own).
        snapshot_dtype: ``torch.float32`` (exact) or ``torch.bfloat16`` (half the memory).
        on_error: ``'skip'``: a failed prediction (exception or NaN/Inf) leaves parameters and optimizer state
            untouched, logs a warning, drops the snapshots, and training goes on; ``'raise'``: re-raise it,
            with the wrapper's state as before the call.
        arch, num_heads, num_key_value_heads: override the architecture detection of :func:`build_graph`.
        graph: a prebuilt neural graph of the predicted parameters (skips building one; its fingerprint must
            match them), or with ``distributed=True`` this process's part of it
            (``nino_fast.distributed.build_graph_shard``).
        nino_device: where the prediction runs; default the device of the first predicted parameter.
        backend: kernel backend for :meth:`NiNoModel.nowcast` (None: automatic).
        distributed: split each NiNo step over the processes of ``torch.distributed`` (DDP training: every process
            holds the same parameters; see the module docstring). Needs an initialised process group.
        dist_group: the process group to use (default: a new group of all processes, made here, so that NiNo's
            collectives never interleave with DDP's; gloo when the prediction runs on the CPU).
        dist_timeout: seconds (or a ``timedelta``) after which a process that does not answer makes the others
            fail the step (default: torch.distributed's default timeout). Ignored with ``dist_group``.

    Attributes:
        step_idx: counted calls so far. num_snapshots: snapshots kept in the current window.
        last_nino_step: None, or a dict about the last NiNo step attempted: ``step`` (1-based counted call),
            ``k``, ``seconds``, ``update_norm`` (L2 norm of the parameter change; 0 when it failed), ``ok``.
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
        if not isinstance(base_opt, torch.optim.Optimizer):
            raise TypeError(f"NiNo: base_opt must be a torch.optim.Optimizer, got {type(base_opt).__name__}")
        if isinstance(base_opt, NiNo):
            raise TypeError("NiNo: base_opt is already a NiNo wrapper")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"NiNo: model must be an nn.Module, got {type(model).__name__}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"NiNo: on_error must be 'skip' or 'raise', got {on_error!r}")
        if snapshot_dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            raise ValueError(f"NiNo: snapshot_dtype must be a floating dtype, got {snapshot_dtype}")
        if not (isinstance(k_decay, (int, float)) and not isinstance(k_decay, bool) and k_decay > 0):
            raise ValueError(f"NiNo: k_decay must be a number > 0, got {k_decay!r}")
        self.period = _check_int("period", period, 1)
        self.max_train_steps = _check_int("max_train_steps", max_train_steps, 0)
        self.k_decay = float(k_decay)
        self._init_optimizer_hooks()
        self.base_opt = base_opt
        self.distributed, self._group, self._shard, self._dist_broken = bool(distributed), dist_group, None, None
        if self.distributed:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "NiNo(distributed=True): torch.distributed is not initialised (torchrun + init_process_group)"
                )
            if dist_timeout is not None and not isinstance(dist_timeout, timedelta):
                if not dist_timeout > 0:
                    raise ValueError(f"NiNo: dist_timeout must be > 0 seconds, got {dist_timeout!r}")
                dist_timeout = timedelta(seconds=float(dist_timeout))
        self._dist_timeout = dist_timeout
        self.snapshot_dtype, self.on_error, self.backend = snapshot_dtype, on_error, backend
        self._graph_args = dict(arch=arch, num_heads=num_heads, num_key_value_heads=num_key_value_heads)
        self.predictor = load_predictor(_default_ckpt() if ckpt is None else ckpt, ctx)
        self.step_idx = 0
        self.num_snapshots = 0
        self.last_nino_step = None
        self._running = None  # while step() runs: whether this call is a NiNo step (need_grads in closures)
        self.graph = None
        self._snapshots = None
        self.nino_device = nino_device
        if self.predictor is None:
            logger.info("NiNo: ckpt=%r: no NiNo steps, the wrapper runs %s alone", ckpt, type(base_opt).__name__)
            self.ctx = self.interval = 0
            self._k_schedule = []
            self._set_params(model)
            return
        self.ctx = int(self.predictor.ctx)
        if self.period % self.ctx:
            raise ValueError(
                f"NiNo: period ({self.period}) must be a multiple of ctx ({self.ctx}): snapshots are taken every "
                f"period // ctx steps, e.g. period={self.period // self.ctx * self.ctx or self.ctx}"
            )
        self.interval = self.period // self.ctx
        self._k_schedule = k_schedule(int(self.predictor.seq_len), self.max_train_steps, self.period, self.k_decay)
        self.set_model(model, graph=graph)

    def _init_optimizer_hooks(self) -> None:
        """What ``torch.optim.Optimizer.__init__`` sets up besides the parameter groups (which are the base's):
        hook tables and the step wrapper that calls the step hooks."""
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(self, name, OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # ---- the base optimizer's groups, state and defaults, shared --------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.base_opt.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.base_opt.param_groups = groups

    @property
    def state(self):
        return self.base_opt.state

    @state.setter
    def state(self, state) -> None:
        self.base_opt.state = state

    @property
    def defaults(self) -> dict:
        return self.base_opt.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self.base_opt.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base optimizer. Its trainable parameters of ``model`` join the neural graph at the
        start of the next snapshot window (until then the base optimizer steps them and NiNo steps leave them)."""
        self.base_opt.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``. Before a call that NiNo replaces, one predicted parameter keeps a
        zero gradient: ``GradScaler.step`` needs at least one gradient to record its inf check, and
        ``scaler.update()`` one record, even on a step whose backward was skipped."""
        self.base_opt.zero_grad(set_to_none=set_to_none)
        if self.predictor is not None and self._params and self.next_step_nino:
            p = self._params[-1]
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ---- set-up --------------------------------------------------------------------------------------------
    def _predicted(self, model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[str]]:
        """(name, parameter) of the trainable parameters of ``model`` that the base optimizer holds, in module
        order; and the names of the trainable ones it does not hold."""
        held = {id(p) for g in self.param_groups for p in g["params"]}
        named, missing = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in held:
                named.append((n, p))
            else:
                missing.append(n)
        return named, missing

    def _set_params(self, model: torch.nn.Module) -> None:
        self.model = model
        self.module = unwrap_model(model)
        named, missing = self._predicted(self.module)
        if not named and self.predictor is not None:
            raise ValueError(
                "NiNo: none of the model's trainable parameters (requires_grad=True) is in the base optimizer"
            )
        if missing and self.predictor is not None:
            logger.warning(
                "NiNo: %d trainable parameters of the model are not in the base optimizer (e.g. %s); NiNo steps "
                "leave them alone (add_param_group adds them at the next snapshot window)",
                len(missing),
                missing[0],
            )
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.num_params = sum(p.numel() for p in self._params)
        self.fingerprint = fingerprint([(n, tuple(p.shape)) for n, p in named])

    def set_model(self, model: torch.nn.Module, graph=None) -> None:
        """(Re)read the predicted parameters of ``model`` and build their neural graph; drops kept snapshots.
        (Done by itself at the start of a window when the trainable parameters of the optimizer changed.)"""
        self._set_params(model)
        if self.predictor is None:
            return
        if isinstance(self.predictor, torch.nn.Module):  # official default: NiNo runs where the model is
            self.predictor.to(self.nino_device or self._params[0].device)
        if graph is None and getattr(self.predictor, "needs_graph", True):
            graph = self._build_graph()
        if graph is not None:
            self._check_graph(graph)
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

    def _arch_args(self) -> dict:
        arch, heads, kv = detect_arch(self.module)
        args = dict(self._graph_args)
        for key, detected in (("arch", arch), ("num_heads", heads), ("num_key_value_heads", kv)):
            if args[key] is None:  # given values win, and are checked by the graph builder (0 is refused)
                args[key] = detected
        cls = type(self.module)
        if args["arch"] == "generic" and cls.__module__.split(".")[0] in ("transformers", "torchvision"):
            logger.warning(
                "NiNo: %s.%s is not an architecture nino_fast knows (gpt2, llama, bert, qwen3, vit): the neural "
                "graph is the generic one (no attention-head edges); pass arch=/num_heads= to choose",
                cls.__module__,
                cls.__name__,
            )
        return args

    def _build_graph(self):
        args = self._arch_args()
        named = [(n, tuple(p.shape)) for n, p in zip(self._names, self._params, strict=True)]
        t0 = time.perf_counter()
        try:
            graph = self._graph_of(named, args)
        except ValueError as exc:
            if args["arch"] in (None, "generic") or self._graph_args["arch"]:
                raise
            logger.warning(
                "NiNo: the %s graph does not fit the predicted parameters (%s); using the generic graph (no "
                "attention-head edges)",
                args["arch"],
                exc,
            )
            args = dict(args, arch="generic", num_heads=None, num_key_value_heads=None)
            graph = self._graph_of(named, args)
        logger.info(
            "NiNo: neural graph (%s) of %d parameters built in %.2fs%s",
            args["arch"] or "generic",
            graph.num_params,
            time.perf_counter() - t0,
            f" (this process's part: {graph.local.num_edges} of {graph.num_edges} edges)"
            if isinstance(graph, GraphShard)
            else "",
        )
        return graph

    def _graph_of(self, named, args):
        if self._sharded():  # this process's part only: the whole graph is never built here
            rank, world = dist.get_rank(self._group), dist.get_world_size(self._group)
            return build_graph_shard(named, rank, world, lpe=int(self.predictor.lpe), **args)
        return build_graph(named, lpe=int(self.predictor.lpe), **args)

    def _check_graph(self, graph) -> None:
        if graph.num_params != self.num_params:
            raise ValueError(
                f"NiNo: the graph has {graph.num_params} parameters, the model has {self.num_params} predicted ones"
            )
        whole = graph.local if isinstance(graph, GraphShard) else graph  # (a part keeps the whole's fingerprint)
        whole.check_matches([(n, tuple(p.shape)) for n, p in zip(self._names, self._params, strict=True)], "NiNo")

    def _refresh_params(self) -> None:
        """At the start of a window: rebuild the graph when the predicted parameter set changed (a group added,
        a parameter frozen or unfrozen)."""
        named, _ = self._predicted(self.module)
        if [id(p) for _, p in named] != [id(p) for p in self._params]:
            logger.info(
                "NiNo: the predicted parameters changed (%d -> %d tensors): new neural graph",
                len(self._params),
                len(named),
            )
            self.set_model(self.model)

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

    # ---- schedule ------------------------------------------------------------------------------------------
    def get_k(self, step: int | None = None) -> int:
        """The schedule's horizon for 0-based call index ``step`` (default: the current one)."""
        if not self._k_schedule:
            raise ValueError("NiNo.get_k: no NiNo predictor (ckpt='none')")
        step = self.step_idx if step is None else step
        return self._k_schedule[min(len(self._k_schedule) - 1, step // self.period)]

    @property
    def next_step_nino(self) -> bool:
        """True when the next counted :meth:`step` call is a NiNo step (it runs no base optimizer step)."""
        return (
            self.predictor is not None
            and self.num_snapshots == self.ctx - 1
            and (self.step_idx + 1) % self.interval == 0
        )

    @property
    def need_grads(self) -> bool:
        """False when the next counted :meth:`step` call is a NiNo step: its gradients would not be used (with
        gradient accumulation: the gradients of every micro-batch before it). Inside a closure that
        :meth:`step` is running, it describes that call."""
        if self._running is not None:
            return not self._running
        return not self.next_step_nino

    def _counts(self) -> bool:
        """Whether this call is an optimizer step: with Accelerate's ``AcceleratedOptimizer`` as the base, calls
        made while gradients accumulate are not."""
        state = getattr(self.base_opt, "gradient_state", None)
        return bool(getattr(state, "sync_gradients", True)) and bool(getattr(self.base_opt, "sync_gradients", True))

    # ---- steps ---------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None, k: int | None = None):
        """One training step: a base optimizer step, or a NiNo step every ``period`` counted calls.

        ``closure`` is passed to the base optimizer; on a NiNo step it is called once, before the parameters
        are replaced (``need_grads`` is False inside it), and its loss returned, as ``torch.optim`` optimizers
        do. ``k`` overrides the scheduled horizon of this call if it is a NiNo step. Returns the closure's
        loss or None. Whatever it raises, the wrapper is as before the call.
        """
        if not self._counts():
            return self.base_opt.step(closure)  # an accumulation micro-batch: the base does nothing either
        if self.predictor is None:
            loss = self.base_opt.step(closure)
            self.step_idx += 1
            return loss
        before, self._committed = (self.step_idx, self.num_snapshots), False
        is_nino = self.next_step_nino
        self._running = is_nino
        try:
            if not is_nino:
                if (self.step_idx + 1) % self.interval == 0:
                    self._record()
                loss = self.base_opt.step(closure)
                self.step_idx += 1
                return loss
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._record()
            self._nino_step(self.get_k() if k is None else k, at=self.step_idx + 1)
            return loss
        except BaseException:
            if not self._committed:
                self.step_idx, self.num_snapshots = before
            raise
        finally:
            self._running = None

    def after_step(self, k: int | None = None) -> bool:
        """For training loops that always run the base step themselves (e.g. the Hugging Face callback): count
        the step that just finished; every ``period // ctx`` steps record the parameters, and when ``ctx``
        snapshots are in, replace them by the prediction. Returns True if it applied a NiNo step. (Unlike
        :meth:`step`, no base step is saved: the NiNo step comes on top of the step that completed the
        window.) Whatever it raises, the wrapper is as before the call."""
        at = self.step_idx + 1
        if self.predictor is None or at % self.interval:
            self.step_idx = at
            return False
        before, self._committed = (self.step_idx, self.num_snapshots), False
        try:
            self._record()
            if self.num_snapshots < self.ctx:
                self.step_idx = at
                return False
            return self._nino_step(self.get_k(at - 1) if k is None else k, at=at)
        except BaseException:
            if not self._committed:
                self.step_idx, self.num_snapshots = before
            raise

    @torch.no_grad()
    def _record(self) -> None:
        if self.num_snapshots == 0:
            self._refresh_params()
        row = self._snapshots[self.num_snapshots]
        off = 0
        for p in self._params:  # one copy per parameter tensor into the preallocated row
            n = p.numel()
            row[off : off + n].copy_(p.detach().reshape(-1))
            off += n
        self.num_snapshots += 1

    def _predict(self, k: int) -> torch.Tensor:
        """The prediction from the ``ctx`` snapshots, checked (shape, finiteness); raises on failure."""
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
        return pred

    def _nino_step(self, k, at: int) -> bool:
        """Predict from the ``ctx`` snapshots and write the parameters, then count call ``at`` as done; False if
        the prediction failed and was skipped. Ctrl-C during the prediction leaves everything unwritten; during
        the write (and the counters' update) it is held back until both are complete."""
        if isinstance(k, np.integer):
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"NiNo.step: k must be an int, got {k!r}")
        t0 = time.perf_counter()
        try:
            pred, failure = self._predict(k), None
        except Exception as exc:
            pred, failure = None, exc
        if self.distributed:  # every process learns whether all succeeded before any of them writes
            failure = self._agree(failure)
        if failure is not None and self.on_error == "raise":
            self.last_nino_step = dict(step=at, k=k, seconds=time.perf_counter() - t0, update_norm=0.0, ok=False)
            raise failure
        with _interrupts_held():
            norm = 0.0 if failure is not None else self._write(pred)
            self.num_snapshots, self.step_idx, self._committed = 0, at, True
        seconds = time.perf_counter() - t0
        self.last_nino_step = dict(step=at, k=k, seconds=seconds, update_norm=norm, ok=failure is None)
        if failure is not None:
            logger.warning(
                "NiNo step at step %d (k=%s) failed, parameters left unchanged and snapshots dropped: %s: %s",
                at,
                k,
                type(failure).__name__,
                failure,
            )
            return False
        logger.info(
            "NiNo step at step %d (k=%d, %s): %.3fs for %d parameters, update norm %.4g",
            at,
            k,
            type(self.predictor).__name__,
            seconds,
            self.num_params,
            norm,
        )
        return True

    @torch.no_grad()
    def _write(self, pred: torch.Tensor) -> float:
        """Write the prediction into the parameters, in place (keeps dtype, device and storage); parameters frozen
        since the window began are left alone. Returns the L2 norm of the change."""
        sq, off = 0.0, 0
        for p in self._params:
            n = p.numel()
            if p.requires_grad:
                new = pred[off : off + n].view_as(p)
                sq += float((new.to(p.device, torch.float64) - p.detach().double()).square().sum())
                p.data.copy_(new)
            off += n
        return math.sqrt(sq)

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
    def nino_state_dict(self) -> dict:
        """NiNo's own state: counters, the kept snapshots (a copy) and what they were taken of (parameter count,
        ctx, period, the model's fingerprint). Without the base optimizer's state (see :meth:`state_dict`)."""
        n = self.num_snapshots
        return {
            "step_idx": self.step_idx,
            "num_snapshots": n,
            "snapshots": None if self._snapshots is None or not n else self._snapshots[:n].clone(),
            "num_params": self.num_params,
            "ctx": self.ctx,
            "period": self.period,
            "fingerprint": self.fingerprint,
        }

    def state_dict(self) -> dict:
        """torch's optimizer format (the base optimizer's ``state`` and ``param_groups``) plus ``"nino"``:
        :meth:`nino_state_dict`, so that a resumed run continues exactly as an uninterrupted one (the official
        wrapper saves only the base optimizer). Runs the state-dict hooks registered on the wrapper."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = dict(self.base_opt.state_dict())
        out["nino"] = self.nino_state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            out = out if result is None else result
        return out

    def _checked_nino_state(self, saved) -> tuple[int, int, torch.Tensor | None]:
        """(step_idx, num_snapshots, snapshots) of a :meth:`nino_state_dict`, after checking all of it against
        this wrapper; raises ValueError naming the first problem, changing nothing."""
        where = "NiNo.load_state_dict"
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: the NiNo state must be a dict, got {type(saved).__name__}")
        missing = [k for k in ("step_idx", "num_snapshots", "snapshots", "num_params", "ctx") if k not in saved]
        if missing:
            raise ValueError(f"{where}: missing key {missing[0]!r} (not a NiNo state_dict?)")

        def integer(key, low, high=None):
            v = saved[key]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low or high is not None and v > high:
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{where}: {key} must be an int {bounds}, got {v!r}")
            return int(v)

        if (integer("num_params", 0), integer("ctx", 0)) != (self.num_params, self.ctx):
            raise ValueError(
                f"{where}: saved for {saved['num_params']} parameters and ctx={saved['ctx']}, this wrapper has "
                f"{self.num_params} and ctx={self.ctx}"
            )
        if "period" in saved and self.predictor is not None and integer("period", 1) != self.period:
            raise ValueError(f"{where}: saved with period={saved['period']}, this wrapper has period={self.period}")
        if saved.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                f"{where}: saved for another model (fingerprint {saved['fingerprint']}, this model's parameters "
                f"give {self.fingerprint})"
            )
        step_idx = integer("step_idx", 0)
        # a window never rests full: ctx kept snapshots would be a state saved in the middle of a NiNo step
        count = integer("num_snapshots", 0, max(self.ctx - 1, 0))
        if self.interval and count > step_idx // self.interval:
            raise ValueError(f"{where}: {count} snapshots cannot have been taken in {step_idx} steps")
        snaps = saved["snapshots"]
        if count:
            if not isinstance(snaps, torch.Tensor) or not snaps.is_floating_point():
                raise ValueError(f"{where}: snapshots must be a floating tensor, got {type(snaps).__name__}")
            if tuple(snaps.shape) != (count, self.num_params):
                raise ValueError(
                    f"{where}: snapshots have shape {tuple(snaps.shape)}, expected ({count}, {self.num_params})"
                )
            if not bool(torch.isfinite(snaps).all()):
                raise ValueError(f"{where}: the snapshots hold NaN/Inf values")
        return step_idx, count, snaps if count else None

    def load_nino_state_dict(self, saved: dict) -> None:
        """Restore :meth:`nino_state_dict`'s output (snapshots cast to ``snapshot_dtype``); all checked first."""
        step_idx, count, snaps = self._checked_nino_state(saved)
        self._apply_nino_state(step_idx, count, snaps)

    def _apply_nino_state(self, step_idx: int, count: int, snaps) -> None:
        if count:
            self._snapshots[:count].copy_(snaps)
        self.step_idx, self.num_snapshots = step_idx, count

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output (also the older ``{"base": ..., "step_idx": ...}`` layout). The
        NiNo part and the base optimizer's groups are checked before anything changes; then the base optimizer
        loads its part and the wrapper its own (which cannot fail any more)."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if "nino" in state_dict:
            saved = state_dict.pop("nino")
            base = state_dict
        elif "base" in state_dict:  # the layout before NiNo was a torch Optimizer
            saved, base = state_dict, state_dict["base"]
        else:
            raise ValueError("NiNo.load_state_dict: missing key 'nino' (not a NiNo state_dict?)")
        step_idx, count, snaps = self._checked_nino_state(saved)
        self._check_base_groups(base)
        self.base_opt.load_state_dict(base)
        self._apply_nino_state(step_idx, count, snaps)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_base_groups(self, base) -> None:
        """The checks ``torch.optim.Optimizer.load_state_dict`` makes, made before the NiNo part is applied."""
        where = "NiNo.load_state_dict"
        if not isinstance(base, dict) or not isinstance(base.get("param_groups"), list) or "state" not in base:
            raise ValueError(f"{where}: the base optimizer's part needs 'state' and 'param_groups'")
        sizes = [len(g["params"]) for g in self.param_groups]
        saved = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in base["param_groups"]]
        if sizes != saved:
            raise ValueError(f"{where}: parameter groups of sizes {saved} saved, the optimizer has {sizes}")

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
