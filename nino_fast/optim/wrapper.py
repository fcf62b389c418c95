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

Distributed data parallel training (``distributed=True``): see :mod:`nino_fast.optim.agreement`; snapshots:
:mod:`nino_fast.optim.snapshots`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import torch

from .. import plan
from ..baselines import Linefit
from ..distributed import GraphShard, build_graph_shard
from ..graph import (
    GraphLayout,
    build_graph,
    build_graph_layout,
    config_heads,
    detect_arch,
    fingerprint,
    values_per_edge,
)
from ..graph.entries import TRANSFORMERS
from ..history import ColumnsHistory
from ..model import NiNoModel
from ..stream import available_memory, in_memory_bytes, supports_layout
from ..wrapped import unwrap_model
from .agreement import Agreement, check_distributed
from .predictors import default_ckpt, load_predictor
from .schedule import check_int, k_schedule, snapshot_interval
from .snapshots import DTYPES, SnapshotBuffer
from .state import check_base_groups, check_nino_state

logger = logging.getLogger(__package__)


# set by wrappers' owners that save NiNo's state themselves (the Hugging Face callback's nino_state.pt)
STATE_SAVED_ELSEWHERE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nino_state_saved_elsewhere", default=False
)


def _fsdp_sharded(model: torch.nn.Module, named) -> str | None:
    """The name of a parameter FSDP shards (FSDP2's DTensors, FSDP1's flat parameters or the parameters of a
    FullyShardedDataParallel module), else None."""
    for n, p in named:
        parts = n.split(".")
        if (
            type(p).__name__ in ("DTensor", "FlatParameter")
            or "_flat_param" in parts
            or "_fsdp_wrapped_module" in parts
        ):
            return n
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return named[0][0] if named else "?"
    return None


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
            baselines; None (the default): the bundled checkpoint for the model, said at INFO
            (:data:`nino_fast.checkpoints.LM` for transformers and models with token embeddings,
            :data:`nino_fast.checkpoints.SMALL` otherwise; :func:`nino_fast.optim.predictors.default_ckpt`);
            ``'none'``: no NiNo steps (the wrapper is then a pass-through to the base optimizer).
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
            (``nino_fast.distributed.build_graph_shard``), or a :class:`~nino_fast.graph.pieces.GraphLayout`
            (``build_graph_layout(model)``): each NiNo step then assembles the graph tile by tile and reads the
            snapshot buffer one parameter tensor at a time (same result; chosen by itself when the built graph
            and the float32 history would take more than half the available memory).
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
        if snapshot_dtype not in DTYPES:
            raise ValueError(f"NiNo: snapshot_dtype must be a floating dtype, got {snapshot_dtype}")
        if not (isinstance(k_decay, (int, float)) and not isinstance(k_decay, bool) and k_decay > 0):
            raise ValueError(f"NiNo: k_decay must be a number > 0, got {k_decay!r}")
        self.period = check_int("NiNo", "period", period, 1)
        self.max_train_steps = check_int("NiNo", "max_train_steps", max_train_steps, 0)
        self.k_decay = float(k_decay)
        self._init_optimizer_hooks()
        self.base_opt = base_opt
        self.distributed = bool(distributed)
        self._dist = Agreement(dist_group, check_distributed(dist_timeout)) if self.distributed else None
        self.snapshot_dtype, self.on_error, self.backend = snapshot_dtype, on_error, backend
        self._graph_args = dict(arch=arch, num_heads=num_heads, num_key_value_heads=num_key_value_heads)
        if ckpt is None:
            ckpt = default_ckpt(unwrap_model(model), arch)
        self.predictor = load_predictor(ckpt, ctx)
        self.step_idx = 0
        self.last_nino_step = None
        self._running = None  # while step() runs: whether this call is a NiNo step (need_grads in closures)
        self._planted = None  # (parameter, zero gradient) that zero_grad left for a NiNo step
        self.graph = None
        self.snapshots: SnapshotBuffer | None = None
        self.nino_device = nino_device
        if self.predictor is None:
            logger.info("NiNo: ckpt=%r: no NiNo steps, the wrapper runs %s alone", ckpt, type(base_opt).__name__)
            self.ctx = self.interval = 0
            self._k_schedule = []
            self._set_params(model)
            return
        if type(base_opt).__module__.startswith("accelerate") and not STATE_SAVED_ELSEWHERE.get():
            logger.warning(
                "NiNo: the base optimizer is prepared by Accelerate: accelerator.save_state saves the prepared "
                "optimizer only; register this wrapper (accelerator.register_for_checkpointing(opt)) to keep NiNo's "
                "counters and snapshots, or prepare NiNo(base) instead"
            )
        self.ctx = int(self.predictor.ctx)
        self.interval = snapshot_interval(self.period, self.ctx)
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
        if self.predictor is not None and self.next_step_nino:
            p = next((p for p in reversed(self._params) if p.requires_grad), None)
            if p is not None and p.grad is None:
                p.grad = torch.zeros_like(p)
                # taken back after the NiNo step (a sparse parameter wants no dense grad)
                self._planted = (p, p.grad, p.grad._version)

    def _unplant(self) -> None:
        """Remove the zero gradient :meth:`zero_grad` left for the NiNo step, if it is still that untouched zero (a
        backward run anyway accumulates into it: that gradient is the user's)."""
        planted, self._planted = getattr(self, "_planted", None), None
        if planted is not None and planted[0].grad is planted[1] and planted[1]._version == planted[2]:
            planted[0].grad = None

    @property
    def num_snapshots(self) -> int:
        """Snapshots kept in the current window."""
        return 0 if self.snapshots is None else self.snapshots.count

    @num_snapshots.setter
    def num_snapshots(self, count: int) -> None:
        if self.snapshots is not None:
            self.snapshots.count = count

    @property
    def _snapshots(self) -> torch.Tensor | None:
        return None if self.snapshots is None else self.snapshots.data

    @property
    def _dist_broken(self) -> str | None:
        return None if self._dist is None else self._dist.broken

    def __getstate__(self) -> dict:
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ---- set-up --------------------------------------------------------------------------------------------
    def _predicted(self, model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[str]]:
        """(name, parameter) of the trainable parameters of ``model`` that the base optimizer holds and the
        predictor can represent, in module order; and the names of the trainable ones it does not hold."""
        held = {id(p) for g in self.param_groups for p in g["params"]}
        named, missing = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in held:
                named.append((n, p))
            else:
                missing.append(n)
        left_out = self._unpredictable(named)
        return [(n, p) for n, p in named if n not in left_out], missing

    def _unpredictable(self, named) -> dict[str, str]:
        """``{name: why}`` of the tensors the predictor's neural graph cannot hold: shapes a graph does not take
        (scalars, empty or over 4-D tensors), and more values per edge (a kernel's spatial size, prod(shape[2:]))
        than a NiNo checkpoint's edge features hold (9: 3x3 kernels). NiNo does not predict them."""
        if self.predictor is None or not getattr(self.predictor, "needs_graph", True):
            return {}
        limit = self.predictor.max_feat_size if isinstance(self.predictor, NiNoModel) else None
        out = {}
        for n, p in named:
            if p.dim() == 0 or p.dim() > 4 or p.numel() == 0:
                out[n] = f"shape {tuple(p.shape)}: neural graphs take 1-D to 4-D tensors"
            elif limit is not None and values_per_edge(p.shape) > limit:
                out[n] = f"shape {tuple(p.shape)}: more values per edge than the checkpoint's {limit} (3x3 kernels)"
        return out

    def _set_params(self, model: torch.nn.Module, names: list[str] | None = None) -> None:
        self.model = model
        self.module = unwrap_model(model)
        named, missing = self._predicted(self.module)
        if names is not None:  # a saved window's set (see _window_of), whatever is trainable or held now
            wanted = set(names)
            named, missing = [(n, p) for n, p in self.module.named_parameters() if n in wanted], []
        if self.predictor is not None:
            self._check_predicted(named)
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

    def _check_predicted(self, named) -> None:
        """Errors and warnings about what NiNo will predict, before anything is built or moved."""
        if not named:
            raise ValueError(
                "NiNo: none of the model's trainable parameters (requires_grad=True) is in the base optimizer"
                + (" and fits the neural graph" if self._unpredictable(self.module.named_parameters()) else "")
            )
        sharded = _fsdp_sharded(self.model, named)
        if sharded:
            raise ValueError(
                f"NiNo: the model's parameters are sharded by FSDP (e.g. {sharded!r}): each process holds a piece of "
                "each tensor, so neither the neural graph nor one prediction for all processes can be made from "
                "them; train with DDP (NiNo(..., distributed=True) splits the step over the processes)"
            )
        meta = [n for n, p in named if p.device.type == "meta"]
        if meta:
            raise ValueError(
                f"NiNo: {len(meta)} parameters are on the meta device (e.g. {meta[0]!r}: shapes without values); "
                "materialise the model (load its weights, or to_empty() and initialise) before wrapping it"
            )
        trainable = {id(p) for p in self.module.parameters()}
        outside = sum(1 for g in self.param_groups for p in g["params"] if id(p) not in trainable)
        if outside:
            logger.warning(
                "NiNo: %d parameters of the base optimizer are not parameters of the model; NiNo does not predict "
                "them, so on NiNo steps they are not updated",
                outside,
            )
        left_out = self._unpredictable([(n, p) for n, p in self.module.named_parameters() if p.requires_grad])
        if left_out:
            name = next(iter(left_out))
            logger.warning(
                "NiNo: %d tensors do not fit the neural graph (e.g. %r, %s); NiNo does not predict them: the base "
                "optimizer trains them and NiNo steps leave them as they are",
                len(left_out),
                name,
                left_out[name],
            )

    def set_model(self, model: torch.nn.Module, graph=None, names: list[str] | None = None) -> None:
        """(Re)read the predicted parameters of ``model`` and build their neural graph; drops kept snapshots.
        (Done by itself at the start of a window when the trainable parameters of the optimizer changed.)
        ``names``: predict exactly these parameters of ``model`` (a saved window's set) instead."""
        self._set_params(model, names)
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
                    dataclasses.replace(graph, local=graph.local.to(dev))
                    if isinstance(graph, GraphShard)
                    else graph.to(dev)
                )
        self.graph = graph
        self.snapshots = SnapshotBuffer(self.num_params, self.ctx, self.snapshot_dtype)
        if self.distributed:
            device = torch.device(self._predictor_device() or self._params[0].device)
            self._dist.setup(device, self.predictor, graph)

    def _arch_args(self) -> dict:
        given = self._graph_args["arch"]
        if given is None:
            arch, heads, kv = detect_arch(self.module)
        else:  # a given transformer arch takes its head counts from the config when they are not given
            arch, heads, kv = (given, *config_heads(self.module)) if given in TRANSFORMERS else (given, None, None)
        args = dict(self._graph_args)
        for key, detected in (("arch", arch), ("num_heads", heads), ("num_key_value_heads", kv)):
            if args[key] is None:  # given values win, and are checked by the graph builder (0 is refused)
                args[key] = detected
        cls = type(self.module)
        if args["arch"] == "generic" and cls.__module__.split(".")[0] in ("transformers", "torchvision"):
            logger.warning(
                "NiNo: %s.%s is not an architecture nino_fast knows (GPT-2, Llama and Llama-like decoders, BERT, "
                "Qwen3, torchvision's ViT): the neural graph is the generic one (no attention-head edges); pass "
                "arch=/num_heads= to choose",
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
            return build_graph_shard(named, self._dist.rank, self._dist.world, lpe=int(self.predictor.lpe), **args)
        if not self.distributed and supports_layout(self.predictor) and self._graph_too_large():
            logger.info(
                "NiNo: the neural graph is kept as its layout (its edge arrays and the float32 history, ~%.1f GB, "
                "would take more than half the available memory): each step assembles it tile by tile",
                in_memory_bytes(self.num_params, self.ctx) / 1e9,
            )
            return build_graph_layout(named, lpe=int(self.predictor.lpe), **args)
        return build_graph(named, lpe=int(self.predictor.lpe), **args)

    def _graph_too_large(self) -> bool:
        """Whether the built graph and the (P, ctx) float32 history given to the step would take more than half
        the memory available where the prediction runs."""
        need = in_memory_bytes(self.num_params, self.ctx)
        return need > available_memory(torch.device(self._predictor_device() or "cpu")) // 2

    def _check_graph(self, graph) -> None:
        if graph.num_params != self.num_params:
            raise ValueError(
                f"NiNo: the graph has {graph.num_params} parameters, the model has {self.num_params} predicted ones"
            )
        if isinstance(graph, GraphLayout) and not supports_layout(self.predictor):
            raise ValueError(
                f"NiNo: a GraphLayout needs a NiNo checkpoint with the folded plan, not {self.predictor!r}"
            )
        if isinstance(graph, GraphLayout) and self.distributed:
            raise ValueError("NiNo: distributed=True takes a built graph (or its part), not a GraphLayout")
        whole = graph.local if isinstance(graph, GraphShard) else graph  # (a part keeps the whole's fingerprint)
        whole = whole.nodes if isinstance(whole, GraphLayout) else whole
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

    def _sharded(self) -> bool:
        """Whether NiNo steps run sharded over the processes (distributed, with a NiNo GNN of the official
        architecture): then each process needs only its part of the graph."""
        return self.distributed and isinstance(self.predictor, NiNoModel) and plan.supports(self.predictor)

    def _predictor_device(self):
        if not isinstance(self.predictor, torch.nn.Module):
            return None
        return next(self.predictor.parameters()).device

    # ---- schedule ------------------------------------------------------------------------------------------
    def step_metrics(self, step: int) -> dict[str, float] | None:
        """``nino/k``, ``nino/seconds``, ``nino/update_norm`` and ``nino/ok`` of the NiNo step attempted at counted
        call ``step`` (1-based), for loggers; None when the last attempt was at another step (or there was none)."""
        info = self.last_nino_step
        if info is None or info["step"] != step:
            return None
        return {
            "nino/k": float(info["k"]),
            "nino/seconds": float(info["seconds"]),
            "nino/update_norm": float(info["update_norm"]),
            "nino/ok": float(bool(info["ok"])),
        }

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
        self._check_k(k)
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
            self._unplant()
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
        self._check_k(k)
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

    def _record(self) -> None:
        if self.num_snapshots == 0:
            self._refresh_params()
        self.snapshots.record(self._params)

    def _predict(self, k: int) -> torch.Tensor:
        """The prediction from the ``ctx`` snapshots, checked (shape, finiteness); raises on failure."""
        if self._sharded():  # this process's rows only, with the full history's statistics
            pred = self._dist.predict_sharded(self.predictor, self.snapshots, k, self.backend)
        elif self.distributed:
            pred = self._dist.predict_whole(self.predictor, self.graph, self.snapshots.history(), k, self.backend)
        elif isinstance(self.graph, GraphLayout):  # read from the snapshot buffer one tensor at a time
            history = ColumnsHistory(self.snapshots.data, self.graph.param_shapes, self.snapshots.work_dtype)
            pred = self.predictor.nowcast(self.graph, history, k, backend=self.backend)
        else:  # (P, ctx) history, oldest first; bf16 snapshots are widened so that the prediction is float32
            pred = self.predictor.nowcast(self.graph, self.snapshots.history(), k, backend=self.backend)
        if pred.shape != (self.num_params,):
            raise ValueError(f"the prediction has shape {tuple(pred.shape)}, expected ({self.num_params},)")
        bad = (~torch.isfinite(pred)).sum().item()
        if bad:
            raise ValueError(f"the prediction has {bad} NaN/Inf values")
        return pred

    def _check_k(self, k) -> None:
        """A horizon given to step() / after_step(): None (scheduled) or an int in [1, the predictor's horizons]."""
        if k is None or self.predictor is None:
            return
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"NiNo.step: k must be an int, got {k!r}")
        horizons = int(self.predictor.seq_len)
        if not 1 <= k <= horizons:
            raise ValueError(f"NiNo.step: k must be in [1, {horizons}] (the predictor's horizons), got {k}")

    def _nino_step(self, k, at: int) -> bool:
        """Predict from the ``ctx`` snapshots and write the parameters, then count call ``at`` as done; False if
        the prediction failed and was skipped. Ctrl-C during the prediction leaves everything unwritten; during
        the write (and the counters' update) it is held back until both are complete."""
        k = int(k)
        t0 = time.perf_counter()
        try:
            pred, failure = self._predict(k), None
        except Exception as exc:
            pred, failure = None, exc
        if self.distributed:  # every process learns whether all succeeded before any of them writes
            failure = self._dist.agree(failure, self.step_idx, self.snapshots.checksum())
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
        sq, off = torch.zeros((), dtype=torch.float64, device=self._params[0].device), 0
        for p in self._params:
            n = p.numel()
            if p.requires_grad:
                new = pred[off : off + n].view_as(p).to(p.device)
                # summed in float64 on the parameter's device; one host sync for the whole step, not one per tensor
                sq += torch.linalg.vector_norm(new - p.detach(), dtype=torch.float64).square().to(sq.device)
                p.data.copy_(new)
            off += n
        return math.sqrt(float(sq))

    # ---- checkpointing -------------------------------------------------------------------------------------
    def nino_state_dict(self) -> dict:
        """NiNo's own state: counters, the kept snapshots (a copy) and what they were taken of (parameter count,
        ctx, period, the model's fingerprint). Without the base optimizer's state (see :meth:`state_dict`)."""
        n = self.num_snapshots
        return {
            "step_idx": self.step_idx,
            "num_snapshots": n,
            "snapshots": None if self.snapshots is None else self.snapshots.saved(),
            "num_params": self.num_params,
            "ctx": self.ctx,
            "period": self.period,
            "fingerprint": self.fingerprint,
            "names": list(self._names),
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

    def load_nino_state_dict(self, saved: dict) -> None:
        """Restore :meth:`nino_state_dict`'s output (snapshots cast to ``snapshot_dtype``); all checked first."""
        with self._window_of(saved):
            checked = check_nino_state(saved, self)
        self._apply_nino_state(*checked)

    _MODEL_ATTRS = ("model", "module", "_names", "_params", "num_params", "fingerprint", "graph", "snapshots")

    @contextlib.contextmanager
    def _window_of(self, saved):
        """Predict the parameter set the saved state's window was taken of, when it differs from the one this
        wrapper reads now (groups added, parameters frozen or unfrozen since that window began): the saving run
        predicted that set until its next window, where :meth:`_refresh_params` switches to the current one, as
        it did there. Undone if the block raises."""
        names = saved.get("names") if isinstance(saved, dict) else None
        if self.predictor is None or not isinstance(names, list) or names == self._names:
            yield
            return
        params = dict(self.module.named_parameters())
        if any(n not in params for n in names) or saved.get("fingerprint") != fingerprint(
            [(n, tuple(params[n].shape)) for n in names]
        ):  # not a subset of this model's parameters: the checks say what differs
            yield
            return
        before = {k: getattr(self, k) for k in self._MODEL_ATTRS}
        try:
            self.set_model(self.model, names=names)
            yield
        except BaseException:
            for k, v in before.items():
                setattr(self, k, v)
            raise

    def _apply_nino_state(self, step_idx: int, count: int, snaps) -> None:
        if self.snapshots is not None:
            self.snapshots.restore(count, snaps)
        self.step_idx = step_idx

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
        elif "state" in state_dict and "param_groups" in state_dict:  # the base optimizer's own state dict
            saved, base = None, state_dict
        else:
            raise ValueError("NiNo.load_state_dict: missing key 'nino' (not a NiNo state_dict?)")
        if saved is None or self.predictor is None:
            check_base_groups(self.param_groups, base)
            self._load_without_window(saved, base)
        else:
            with self._window_of(saved):
                checked = check_nino_state(saved, self)
                check_base_groups(self.param_groups, base)
            self.base_opt.load_state_dict(base)
            self._apply_nino_state(*checked)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_without_window(self, saved, base) -> None:
        """The base optimizer's state and the step count only: a state without NiNo's part (e.g. a run trained
        with the base optimizer alone; the step count then from the base's per-parameter ``step``, if it keeps
        one), or any state into a wrapper without NiNo steps (``ckpt='none'``)."""
        if saved is not None:
            step_idx = check_int("NiNo.load_state_dict", "step_idx", saved.get("step_idx"), 0)
            logger.info(
                "NiNo.load_state_dict: no NiNo steps in this wrapper (ckpt='none'): its saved snapshots dropped"
            )
        else:
            steps = [int(v["step"]) for v in base["state"].values() if isinstance(v, dict) and "step" in v]
            step_idx = max(steps, default=0)
            if self.predictor is not None:
                logger.warning(
                    "NiNo.load_state_dict: a state without NiNo's part (the base optimizer's own): loaded into the "
                    "base optimizer; NiNo counts from step %d%s and starts a new snapshot window",
                    step_idx,
                    "" if steps else " (the base keeps no step count: set opt.step_idx to the step reached)",
                )
        self.base_opt.load_state_dict(base)
        if self.snapshots is not None:
            self.snapshots.count = 0
        self.step_idx = step_idx

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
