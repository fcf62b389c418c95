"""Sharded NiNo inference over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of P processes owns a contiguous range of destination nodes holding ~E/P edges (CSR rows) and the parameters
living on those edges (:func:`param_shard`); it only ever touches its own parameters' history:

1. scaling statistics: from the full history when every process has it (``scale_stats``: bitwise those of one
   process, no communication), else from each process's rows combined by small ``(T,)`` all-reduces (sums, then
   centred sums of squares in float64 for ``std``; max / -min for ``min-max``, exact);
2. the streamed step of :mod:`nino_fast.stream` on its rows (:class:`~nino_fast.stream.Sharded`): destination-row
   tiles within ``max_memory``, raw edge features scaled on the fly from its history rows, the folded plan's
   stages (:mod:`nino_fast.plan`). Node states (N x D) are replicated: after each of the two message passes the
   processes exchange their rows of the aggregation with one all-reduce of an (N, D) buffer (each row is non-zero
   on one process only, so the sum is exact), i.e. O(N * D) bytes per layer;
3. residual and unscaling of its parameters, then one all-reduce of a ``(n_params + P,)`` vector: every parameter is
   written by exactly one process, and the last P slots carry each process's failure code.

A process needs only its part of the neural graph (all nodes, only its edges: about 1/P of the CSR arrays):
:func:`build_graph_shard` assembles it from the block layout without ever building the whole graph,
:func:`shard_graph` cuts it from a built one; pass it instead of the whole graph.

Every process gets the same result. With full histories, or own rows and the full history's statistics given as
``scales=``, it is bitwise that of ``NiNoModel.nowcast`` on one process at the same thread count given the same
graph, LPE included (the CPU kernels reduce each destination row in its own edge order whatever the rows around it;
the node updates and WNN+ run torch's GEMMs, whose results can depend on the thread count: MKL on an Intel Xeon).
With own rows and no ``scales``, the per-tensor statistics are combined from the parts in float64 instead of torch's
float32 reductions over the whole tensor, whose order no split can reproduce: ``std`` may then round differently
(~1e-7 relative; the other methods stay bitwise).

The LPE is the one node input each process computes for itself (:func:`build_graph_shard` solves the eigenproblem on
every process), and it is not a function of the graph alone: eigenvectors of repeated eigenvalues (symmetric
attention heads, identical neurons: GPT-2, Llama, ...) come out of LAPACK / ARPACK in a basis that depends on the
BLAS thread count (torchrun sets ``OMP_NUM_THREADS=1``), up to O(1) per entry: 1e-5 to 4e-5 of the largest
parameter in the prediction of a small GPT-2 or Llama. The processes compare a hash of their LPEs with the input
check and, if they differ, all use rank 0's (one (N, k) broadcast), so the result is always one process's step on
one graph: the process with rank 0's LPE. A one-process reference is bitwise equal when it has that LPE too: the
same ``lpe=`` tensor, or one computed with the same BLAS thread count.

Failures are agreed, never half-way: invalid inputs on any process (or inputs that differ between processes) raise
``ValueError`` on all of them before any work; an exception or a non-finite prediction on one process is carried
to the others in the last all-reduce (that process still joins the remaining collectives with zero buffers, so the
group stays in step) and all of them raise (``RuntimeError`` / ``ValueError``). A process that dies or does not
answer within the process group's timeout (``init_process_group(timeout=...)`` or ``new_group(timeout=...)``)
makes the others raise :class:`CommError` naming the collective — never a hang beyond that timeout. Nothing here
writes parameters: callers write them only after the whole step succeeded.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os

import torch
import torch.distributed as dist

from . import plan
from ._extension import release_cpu_buffers
from .finish import NonFinitePrediction
from .graph import NeuralGraph
from .graph.build import build_graph_part
from .graph.neural_graph import row_ranges
from .graph.pieces import GraphPart, RowRange
from .scaling import scale_stats
from .stream import Sharded, nowcast_streamed

CHUNK = 1 << 16  # history rows per chunk while checking / scaling: bounds those temporaries (~3 MB)
_EXC, _NAN = 1.0, 2.0  # failure codes carried in the result's last slots
MAX = dist.ReduceOp.MAX
log = logging.getLogger(__name__)


class CommError(RuntimeError):
    """A collective failed (a dead or silent peer, a timeout): the process group is no longer in step."""


def shard_bounds(graph: NeuralGraph, world: int) -> list[RowRange]:
    """``world`` contiguous destination-row ranges with about E / world edges each."""
    return row_ranges(graph.rowptr, world)


# One process's piece of the graph is a GraphPart; the earlier names stay for code that imports them.
GraphShard = ParamShard = GraphPart


def param_shard(graph: NeuralGraph, rank: int, world: int) -> GraphPart:
    """The part of process ``rank`` among ``world`` (see :class:`~nino_fast.graph.pieces.GraphPart`), as views of
    ``graph``; the same on every process."""
    return shard_graph(graph, rank, world, copy=False)


def _check_rank(rank, world, where: str) -> None:
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"{where}: rank must be in 0..world-1 with world >= 1, got rank {rank} of {world}")


def _ids_seg(ids, pos, param_shapes, n_slots: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``(ids, pos, seg)`` of parameters ``ids`` (sorted) at slots ``pos`` (relative to the part's first edge), in
    int32 where every index fits; ``seg``: where each parameter tensor's ids start (and the last ends)."""
    offsets = [0]
    for _, shape in param_shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    idx = torch.int32 if max(offsets[-1], n_slots) < 2**31 else torch.int64  # 4 bytes each
    ids, pos = ids.to(idx), pos.to(idx)
    seg = torch.searchsorted(ids, torch.tensor(offsets, dtype=idx, device=ids.device)).tolist()
    return ids, pos, tuple(seg)


def shard_graph(graph: NeuralGraph, rank: int, world: int, copy: bool = True) -> GraphPart:
    """Process ``rank``'s part of ``graph`` (see :class:`~nino_fast.graph.pieces.GraphPart`), the same on every
    process. With ``copy`` (the default) its edge arrays are copies, so that the caller may free ``graph``: a
    process then holds about 1/world of the graph's edge arrays; ``copy=False`` gives views (no new memory while
    ``graph`` is kept) and keeps ``graph`` as ``whole`` (for predictors that run whole: WNN+, non-official GNNs)."""
    _check_rank(rank, world, "shard_graph")
    rows = shard_bounds(graph, world)[rank]
    n0, n1, e0, e1 = rows
    F = graph.max_feat_size
    pos = graph.param_pos
    mine = ((pos >= e0 * F) & (pos < e1 * F)).nonzero().flatten()
    ids, pos, seg = _ids_seg(mine, pos[mine] - e0 * F, graph.param_shapes, graph.num_edges * F)
    part = (lambda t: t[e0:e1].clone()) if copy else (lambda t: t[e0:e1])  # noqa: E731
    local = dataclasses.replace(
        graph,
        rowptr=(graph.rowptr - e0).clamp_(0, e1 - e0),
        src=part(graph.src),
        dst=part(graph.dst),
        edge_type_u8=part(graph.edge_type_u8),
        param_pos=pos,
        meta=dict(graph.meta, shard=(rank, world)),
        blocks=[],  # the layout describes the whole graph (its perm / LPE), not this part
    )
    whole = None if copy else graph
    return GraphPart(rank, world, rows, ids, seg, local, graph.num_nodes, graph.num_edges, graph.num_params, whole)


def build_graph_shard(model, rank: int, world: int, **kwargs) -> GraphPart:
    """``shard_graph(build_graph(model, **kwargs), rank, world)`` without ever building the whole graph: the
    process's rows are assembled straight from the block layout (:func:`nino_fast.graph.build.build_graph_part`),
    so its peak memory is that of its part (plus O(N) per-node arrays), not the whole graph's. ``kwargs``: those
    of :func:`~nino_fast.graph.build_graph` (``arch``, ``num_heads``, ``num_key_value_heads``, ``lpe``,
    ``lpe_cache``). The same on every process; equal to ``shard_graph`` of the whole graph (tested)."""
    _check_rank(rank, world, "build_graph_shard")
    local, ids, rows = build_graph_part(model, rank, world, **kwargs)
    F, n_edges = local.max_feat_size, local.meta["whole_num_edges"]
    ids, local.param_pos, seg = _ids_seg(ids, local.param_pos, local.param_shapes, n_edges * F)
    local.meta["shard"] = (rank, world)
    n_params = sum(math.prod(s) for _, s in local.param_shapes)
    return GraphPart(rank, world, rows, ids, seg, local, local.num_nodes, n_edges, n_params)


# ---- communication and agreement --------------------------------------------------------------------------------
class _Comm:
    """All-reduces on one group: failures become :class:`CommError`, bytes are counted per collective."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.log: list[tuple[str, int]] = []

    def __call__(self, t: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        return self._run(lambda: dist.all_reduce(t, op=op, group=self.group), t, f"the all-reduce of {what}", what)

    def broadcast(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` replaced by rank 0's, bit for bit (an all-reduce of zeros would turn -0.0 into +0.0)."""
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        return self._run(lambda: dist.broadcast(t, src=src, group=self.group), t, f"the broadcast of {what}", what)

    def _run(self, collective, t: torch.Tensor, name: str, what: str) -> torch.Tensor:
        try:
            collective()
        except Exception as exc:  # a dead or hanging peer: gloo/NCCL raise after the group's timeout
            raise CommError(
                f"nowcast_sharded: rank {self.rank}/{self.world}: {name} failed"
                f" ({type(exc).__name__}: {exc}); no parameters were changed"
            ) from exc
        self.log.append((what, t.numel() * t.element_size()))
        return t


class _Guard:
    """Runs this process's local work. After a local exception it returns zero fallbacks instead, so that the
    process still joins every remaining collective and reports the failure in the result's slots; collective
    failures (:class:`CommError`) propagate."""

    def __init__(self):
        self.failure: Exception | None = None

    def __call__(self, fn, fallback):
        if self.failure is None:
            try:
                return fn()
            except CommError:
                raise
            except Exception as exc:
                self.failure = exc
        return fallback()


class _Rows:
    """The shard's history rows, tensor by tensor and in chunks, whether ``states`` is full or the shard's own."""

    def __init__(self, states: torch.Tensor, shard: GraphPart, full: bool, device, cast: bool = True):
        self.states, self.shard, self.full, self.device, self.cast = states, shard, full, device, cast

    def chunks(self, t: int):
        """(a, b, rows (b - a, C)) for the shard's rows ``a:b`` of parameter tensor t (float32 if ``cast``)."""
        lo, hi = self.shard.seg[t], self.shard.seg[t + 1]
        for a in range(lo, hi, CHUNK):
            b = min(hi, a + CHUNK)
            rows = self.states[self.shard.ids[a:b].to(self.states.device)] if self.full else self.states[a:b]
            yield a, b, rows.to(device=self.device, dtype=torch.float32) if self.cast else rows

    def per_tensor(self, fn, T: int) -> torch.Tensor:
        """(T,) float64: the sum over this shard's chunks of ``fn(rows, t)``, for each tensor t."""
        acc = torch.zeros(T, dtype=torch.float64, device=self.device)
        for t in range(T):
            for _, _, x in self.chunks(t):
                acc[t] += fn(x, t)
        return acc


def _validate(model, gs: GraphPart, states, k) -> bool:
    """The checks of ``NiNoModel.nowcast`` on this process's part of the inputs; returns whether ``states`` is
    the full (n_params, ctx) history (else it is the shard's rows ``states[shard.ids]``). Finiteness is checked on
    this process's rows only (each process checks its own; full histories are compared by checksum), so that no
    (n_params, ctx) temporary is made."""
    shard = gs
    if not isinstance(states, torch.Tensor) or states.dim() != 2:
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ValueError(f"nowcast_sharded: states must be a 2-D tensor, got {shape}")
    full = states.shape[0] == gs.num_params
    if states.shape[1] != model.ctx or not (full or states.shape[0] == shard.ids.numel()):
        raise ValueError(
            f"nowcast_sharded: rank {shard.rank}: states has shape {tuple(states.shape)}, expected the full history"
            f" ({gs.num_params}, {model.ctx}) or this shard's rows ({shard.ids.numel()}, {model.ctx})"
        )
    if not plan.supports(model) and not (full and gs.whole is not None):
        raise ValueError(
            "nowcast_sharded: this model runs whole on one process (not sharded): give the whole graph and the full"
            " history"
        )
    if states.is_floating_point():
        rows = _Rows(states, shard, full, states.device, cast=False)
        bad = int(rows.per_tensor(lambda x, t: (~torch.isfinite(x)).sum(), len(gs.param_shapes)).sum())
        if bad:
            raise ValueError(f"NiNoModel: states contain {bad} NaN/Inf values")
    # the model's own dtype / k / graph checks, on a one-row view of the history and of the graph
    m = min(1, states.shape[0])
    one = copy.copy(gs.local)
    one.param_pos = gs.local.param_pos.new_zeros(m)
    model._check_inputs(one, states[:m], k)
    return full


def _checksums(states: torch.Tensor) -> tuple[float, float]:
    """float64 sum and sum of |x| of ``states``, in row chunks (no float64 copy of the whole history; never in
    place: for float64 states ``.double()`` is the caller's tensor itself)."""
    s = a = 0.0
    for i in range(0, states.shape[0], CHUNK):
        x = states[i : i + CHUNK].double()
        s += x.sum().item()
        a += x.abs().sum().item()
    return s, a


def _lpe_digest(model, gs: GraphPart) -> tuple[float, float]:
    """A 64-bit hash of the LPE bytes this process's step reads, as two float64-exact 32-bit halves (0, 0 when the
    step reads none). Each process solves for its LPE itself and the solution can differ between processes (see
    the module docstring), so that the processes learn whether they have the same one before they use it."""
    lpe = gs.local.lpe if getattr(model, "lpe", 0) and plan.supports(model) else None
    if lpe is None:
        return 0.0, 0.0
    raw = lpe.detach().to("cpu", copy=False).contiguous().view(torch.uint8)  # its bytes, whatever its dtype
    h = hashlib.blake2b(raw.numpy(), digest_size=8).digest()
    return float(int.from_bytes(h[:4], "little")), float(int.from_bytes(h[4:], "little"))


def _agree_on_inputs(
    comm: _Comm, model, graph, states, k, full, error, given_scales: bool = False, digest=(0.0, 0.0)
) -> bool:
    """All processes check that they step the same graph with the same k, all with or all without given scales
    (and, given full histories, the same history); a process whose inputs were invalid makes all of them raise
    ValueError. Returns whether the processes' LPE digests (:func:`_lpe_digest`) differ: they then use rank 0's
    LPE (:func:`_rank0_lpe`)."""
    sums = _checksums(states) if error is None and full else (0.0, 0.0)
    sig = torch.tensor(
        [
            float(error is not None),
            float(k) if isinstance(k, int) else -1.0,
            *(float(getattr(graph, a, -1)) for a in ("num_edges", "num_params", "num_nodes", "max_feat_size")),
            float(model.ctx),
            float(full),
            float(given_scales),
            *sums,
            *(digest if error is None else (0.0, 0.0)),  # last: the only entries that may differ
        ],
        dtype=torch.float64,
        device=model.device,
    )
    lo = comm(sig.clone(), "the input check", dist.ReduceOp.MIN)
    hi = comm(sig.clone(), "the input check", MAX)
    if error is not None:
        raise ValueError(f"nowcast_sharded: rank {comm.rank}/{comm.world}: {error}") from error
    if hi[0] > 0:
        raise ValueError(f"nowcast_sharded: rank {comm.rank}/{comm.world}: another process was given invalid inputs")
    if not torch.equal(lo[:-2], hi[:-2]):
        raise ValueError(
            f"nowcast_sharded: rank {comm.rank}/{comm.world}: the processes were given different states, k or "
            f"graphs (checksums min {lo[1:-2].tolist()} vs max {hi[1:-2].tolist()})"
        )
    return not torch.equal(lo[-2:], hi[-2:])


def _rank0_lpe(comm: _Comm, gs: GraphPart) -> GraphPart:
    """``gs`` with rank 0's LPE (a new tensor: the caller's graph is left as it was). The LPEs differ when the
    processes solved the eigenproblem with different BLAS thread counts or libraries: each process's node states
    would then start from its own, and the step would be no single process's."""
    lpe = comm.broadcast(gs.local.lpe.detach().clone().contiguous(), "the LPE")
    if comm.rank == 0:
        log.warning(
            "nowcast_sharded: the processes computed different LPEs (BLAS thread counts or libraries differ); all "
            "use rank 0's"
        )
    return dataclasses.replace(gs, local=dataclasses.replace(gs.local, lpe=lpe))


# ---- scaling ------------------------------------------------------------------------------------------------------
def _scales(comm: _Comm, rows: _Rows, graph: GraphPart, method: str, guard: _Guard) -> torch.Tensor | None:
    """(T, 2) float32 (shift, scale) per parameter tensor for per-tensor methods; (1, 2) for ``min-max-param``
    (parameter 0's range scales all); None for ``std-param`` (row by row)."""
    T, C, dev = len(graph.param_shapes), rows.states.shape[1], rows.device
    if rows.full:  # every process has the whole history: the single-process statistics, bitwise
        if method == "std-param":
            return None
        first = method == "min-max-param"
        return scale_stats(rows.states[:1] if first else rows.states, graph.param_shapes, method, torch.float32).to(dev)
    count = torch.tensor([math.prod(s) * C for _, s in graph.param_shapes], dtype=torch.float64, device=dev)
    zeros = lambda *n: torch.zeros(*n, dtype=torch.float64, device=dev)  # noqa: E731
    if method == "std":  # two passes in float64: the mean, then the centred sum of squares (unbiased std)
        mean = comm(guard(lambda: rows.per_tensor(lambda x, t: x.double().sum(), T), lambda: zeros(T)), "the means")
        mean /= count
        ss = guard(lambda: rows.per_tensor(lambda x, t: (x.double() - mean[t]).square_().sum(), T), lambda: zeros(T))
        std = (comm(ss, "the variances") / (count - 1)).sqrt()
        return torch.stack((mean, std), 1).float()
    if method == "min-max":

        def extremes():
            ext = torch.full((2, T), -math.inf, dtype=torch.float64, device=dev)  # max, -min
            for t in range(T):
                for _, _, x in rows.chunks(t):
                    ext[0, t] = torch.maximum(ext[0, t], x.max().double())
                    ext[1, t] = torch.maximum(ext[1, t], -x.min().double())
            return ext

        none = lambda: torch.full((2, T), -math.inf, dtype=torch.float64, device=dev)  # noqa: E731
        ext = comm(guard(extremes, none), "the ranges", MAX)
        span = (ext[0].float() - (-ext[1]).float()).clamp_min(1e-2)  # max - min in float32, as scale_stats
        return torch.stack((torch.zeros_like(span), span), 1)
    if method == "min-max-param":  # parameter 0's row lives on one process: it sends its scales

        def first():
            sc = torch.zeros(1, 2, dtype=torch.float32, device=dev)
            if rows.shard.ids.numel() and int(rows.shard.ids[0]) == 0:
                t0 = next(t for t in range(T) if rows.shard.seg[t + 1] > rows.shard.seg[t])
                sc[:] = scale_stats(next(rows.chunks(t0))[2][:1], None, method)[:1]
            return sc

        return comm(guard(first, lambda: torch.zeros(1, 2, device=dev)), "the first parameter's range")
    return None


# ---- the step -----------------------------------------------------------------------------------------------------
def _graph_shard(graph, rank: int, world: int) -> GraphPart:
    """``graph`` if it is this process's :class:`GraphShard`, else this process's part of the whole graph (views)."""
    if isinstance(graph, GraphPart):
        if (graph.rank, graph.world) != (rank, world):
            raise ValueError(
                f"nowcast_sharded: the graph shard is rank {graph.rank}'s of {graph.world}, this process"
                f" is rank {rank} of {world}"
            )
        return graph
    if not isinstance(graph, NeuralGraph):
        raise ValueError(f"nowcast_sharded: graph must be a NeuralGraph or a GraphShard, got {type(graph).__name__}")
    return shard_graph(graph, rank, world, copy=False)


@torch.no_grad()
def nowcast_sharded(
    model,
    graph: NeuralGraph | GraphPart,
    states: torch.Tensor,
    k: int,
    group=None,
    backend: str | None = None,
    stats: dict | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``model.nowcast`` split over the processes of ``group``; every process gets the full (n_params,) result.

    Call it on every process with the same ``k``, the same graph -- whole, or each process its own part
    ``shard_graph(graph, rank, world)`` (then it needs to keep only that) -- and either the same full history
    ``states`` (n_params, ctx) or each process its own rows ``states[shard.ids]``. ``max_memory`` and
    ``progress`` are those of ``NiNoModel.nowcast``, for this process's part (the bar on rank 0 only); on the CPU
    the default ``max_memory`` is one process's default divided by the processes on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``, else the group's size), which share its free memory -- or what the part needs at least
    if that is more.
    ``scales``: the scaling statistics of the full history, when the caller has it but passes its own rows only
    (a DDP process whose snapshot buffer is stored transposed: :func:`nino_fast.scaling.scale_stats_of_columns`):
    (T, 2) for per-tensor methods, (1, 2) for ``min-max-param``, None for ``std-param``; they replace the
    all-reduced statistics, so that the result is bitwise that of one process.
    The graphs' LPEs may differ (each process may have solved for its own): all processes then use rank 0's, and the
    result is bitwise one process's step with that LPE (see the module docstring).
    ``stats``, if given, receives the bytes this process sent to collectives (``allreduce_bytes``, per collective
    in ``allreduce_log``, rank 0's LPE among them when it was broadcast) and its shard's size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "nowcast_sharded: torch.distributed is not initialised (use torchrun / init_process_group first)"
        )
    if isinstance(states, torch.Tensor):  # torch orders a reduction's sums by the layout: same values, same bits
        states = states.contiguous()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm = _Comm(group, rank, world)
    device = model.device
    error, full, gs, digest = None, True, None, (0.0, 0.0)
    try:
        gs = _graph_shard(graph, rank, world)
        gs = dataclasses.replace(gs, local=gs.local.to(device))
        full = _validate(model, gs, states, k)
        _check_scales(model, gs, scales)
        digest = _lpe_digest(model, gs)
    except Exception as exc:  # agreed below: every process raises, none waits for the others in a collective
        error = exc
    if _agree_on_inputs(comm, model, graph, states, k, full, error, scales is not None, digest):
        gs = _rank0_lpe(comm, gs)

    P, shard = gs.num_params, gs
    failure: Exception | None = None
    if not plan.supports(model):  # WNN+ (per-parameter, cheap) or a non-official GNN: rank 0 runs it whole
        result = torch.zeros(P + world, dtype=torch.float32, device=device)
        if rank == 0:
            try:
                result[:P] = model.nowcast(gs.whole.to(device), states, k, backend=backend).to(device)
            except Exception as exc:
                failure = exc
    else:
        opts = dict(backend=backend, max_memory=max_memory, progress=progress if rank == 0 else False)
        failure, out = _sharded_step(comm, model, gs, states, k, full, opts, scales)
        # the (P + world,) result only now, after the step's peak: the step held this process's rows only
        result = torch.zeros(P + world, dtype=torch.float32, device=device)
        if out is not None:
            result[shard.ids] = out.to(device=device, dtype=result.dtype)
        del out
    if failure is not None:
        result[:P].zero_()
        result[P + rank] = _NAN if isinstance(failure, NonFinitePrediction) else _EXC
    comm(result, "the prediction")
    release_cpu_buffers()
    codes = result[P:].tolist()
    if stats is not None:
        stats.update(
            allreduce_bytes=sum(b for _, b in comm.log),
            allreduce_log=comm.log,
            shard_nodes=shard.node_hi - shard.node_lo,
            shard_edges=shard.edge_hi - shard.edge_lo,
            shard_params=shard.ids.numel(),
        )
    failed = [r for r, c in enumerate(codes) if c == _EXC]
    if failed:
        raise RuntimeError(
            f"nowcast_sharded: rank {rank}/{world}: the step failed on rank(s) {failed}"
            + (f" ({type(failure).__name__}: {failure})" if failure is not None else "")
            + "; no parameters were changed"
        ) from failure
    nan = [r for r, c in enumerate(codes) if c == _NAN]
    if nan:
        raise ValueError(f"nowcast_sharded: rank {rank}/{world}: the prediction has NaN/Inf values (rank(s) {nan})")
    return result[:P].to(device=states.device, dtype=states.dtype)


def _local_processes(world: int) -> int:
    """Processes of the job on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else the group's size."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ValueError:
        return max(1, world)


def _check_scales(model, gs: GraphPart, scales) -> None:
    """Given statistics must have the shape the model's scale method uses."""
    if scales is None:
        return
    method = model.scale_method
    want = {"std-param": None, "min-max-param": (1, 2)}.get(method, (len(gs.param_shapes), 2))
    if want is None or not isinstance(scales, torch.Tensor) or tuple(scales.shape) != want:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(
            f"nowcast_sharded: scales for scale_method={method!r} must be {'None' if want is None else want}, got {got}"
        )


def _sharded_step(
    comm, model, gs: GraphPart, states, k, full, opts, given_scales=None
) -> tuple[Exception | None, torch.Tensor | None]:
    """This process's part of the step (the streamed step on its rows): ``(failure, out)``, ``out`` the
    predictions of the shard's parameters (``shard.ids`` order), or ``(exception, None)`` after a local failure
    (the process has then joined every remaining collective with zeros, see :class:`_Guard`)."""
    guard, shard, dev = _Guard(), gs, model.device
    passes = len(model.gnn.edge_update)  # message passes whose aggregation the prediction uses: one all-reduce each
    done = [0]

    def combine(agg: torch.Tensor) -> torch.Tensor:  # (N, D), zero outside this process's rows
        done[0] += 1
        return comm(agg, f"message pass {done[0]}")

    rows = _Rows(states, shard, full, dev)
    if given_scales is not None:
        scales = given_scales.to(device=dev, dtype=torch.float32)
    else:
        scales = _scales(comm, rows, gs, model.scale_method, guard)
    if scales is not None and model.scale_method == "min-max-param":  # one (shift, scale) for every row
        scales = scales.expand(states.shape[0], 2)

    def run():
        share = _local_processes(shard.world) if dev.type == "cpu" else 1  # (one GPU per process)
        part = Sharded(gs, combine, full, scales, share)
        where = f"nowcast_sharded: rank {shard.rank}/{shard.world}"
        return nowcast_streamed(model, gs.local, states, k, part=part, where=where, **opts)  # (shard.ids order)

    out = guard(run, lambda: None)
    while done[0] < passes:  # the message passes this process did not reach
        combine(torch.zeros(gs.num_nodes, model.hid, device=dev))
    return guard.failure, out
