"""Sharded NiNo inference over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of P processes owns a contiguous range of destination nodes holding ~E/P edges (CSR rows) and the parameters
living on those edges (:func:`param_shard`); it only ever touches its own parameters' history:

1. scaling statistics: from the full history when every process has it (``scale_stats``: bitwise those of one
   process, no communication), else from each process's rows combined by small ``(T,)`` all-reduces (sums, then
   centred sums of squares in float64 for ``std``; max / -min for ``min-max``, exact);
2. the raw edge features of its own edges (``(E/P, F*ctx)``), scaled on the fly;
3. the folded plan's stages (:mod:`nino_fast.plan`) on its edges. Node states (N x D) are replicated: after each of
   the two message passes the processes exchange their rows of the aggregation with one all-reduce of an (N, D)
   buffer (each row is non-zero on one process only, so the sum is exact), i.e. O(N * D) bytes per layer;
4. residual and unscaling of its parameters, then one all-reduce of a ``(n_params + P,)`` vector: every parameter is
   written by exactly one process, and the last P slots carry each process's failure code.

Every process gets the same result; with full histories it is bitwise that of ``NiNoModel.nowcast`` on one process
(the CPU kernels reduce each destination row in its own edge order whatever the rows around it).

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
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import plan
from ._extension import release_cpu_buffers
from .graph import NeuralGraph
from .graph.layout import HEAD, RESIDUAL, SELF_LOOP
from .model import graph_to
from .scaling import scale_rows, scale_stats, unscale_rows

CHUNK = 1 << 16  # history rows per chunk while checking / scaling: bounds those temporaries (~3 MB)
HEAD_EDGES = 1 << 14  # edges per head call on the CPU: bounds its (chunk, D) intermediate to 8 MB
_EXC, _NAN = 1.0, 2.0  # failure codes carried in the result's last slots
MAX = dist.ReduceOp.MAX


class CommError(RuntimeError):
    """A collective failed (a dead or silent peer, a timeout): the process group is no longer in step."""


class _NonFinite(ValueError):
    """The prediction of this process's parameters is not finite."""


def shard_bounds(graph: NeuralGraph, world: int) -> list[tuple[int, int, int, int]]:
    """``world`` contiguous (node_lo, node_hi, edge_lo, edge_hi) ranges with about E / world edges each."""
    rowptr = graph.rowptr.cpu()
    targets = torch.tensor([round(graph.num_edges * i / world) for i in range(world + 1)], dtype=torch.int64)
    nodes = torch.searchsorted(rowptr, targets).clamp(max=graph.num_nodes)
    nodes[0], nodes[-1] = 0, graph.num_nodes
    nodes = torch.cummax(nodes, 0).values
    return [(int(nodes[i]), int(nodes[i + 1]), int(rowptr[nodes[i]]), int(rowptr[nodes[i + 1]])) for i in range(world)]


@dataclass(frozen=True)
class ParamShard:
    """What process ``rank`` of ``world`` owns: destination nodes ``[node_lo, node_hi)``, their CSR edges
    ``[edge_lo, edge_hi)`` and the parameters on those edges.

    ``ids`` (n,): the parameters (flat indices, sorted); ``pos`` (n,): their feature slots ``e * F + f`` relative
    to ``edge_lo * F`` (int32 below 2^31 slots, else int64); ``seg`` (T+1,): ``ids[seg[t]:seg[t+1]]`` are in
    parameter tensor t.
    """

    rank: int
    world: int
    node_lo: int
    node_hi: int
    edge_lo: int
    edge_hi: int
    ids: torch.Tensor
    pos: torch.Tensor
    seg: tuple[int, ...]

    @property
    def num_params(self) -> int:
        return self.ids.numel()


def param_shard(graph: NeuralGraph, rank: int, world: int) -> ParamShard:
    """The shard of process ``rank`` among ``world`` (see :class:`ParamShard`); the same on every process."""
    if not 0 <= rank < world:
        raise ValueError(f"param_shard: rank must be in 0..{world - 1}, got {rank}")
    n0, n1, e0, e1 = shard_bounds(graph, world)[rank]
    F = graph.max_feat_size
    pos = graph.param_pos
    ids = ((pos >= e0 * F) & (pos < e1 * F)).nonzero().flatten()
    local = pos[ids] - e0 * F
    idx = torch.int32 if max(graph.num_params, graph.num_edges * F) < 2**31 else torch.int64  # 4 bytes each
    ids, local = ids.to(idx), local.to(idx)
    offsets = [0]
    for _, shape in graph.param_shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    seg = torch.searchsorted(ids, torch.tensor(offsets, dtype=idx, device=ids.device)).tolist()
    return ParamShard(rank, world, n0, n1, e0, e1, ids, local, tuple(seg))


def _put_constants(graph: NeuralGraph, raw: torch.Tensor, edge_lo: int, edge_hi: int) -> None:
    """Slot-0 constants of the structural edges of ``[edge_lo, edge_hi)`` (``NeuralGraph.edge_constants``)."""
    t = graph.edge_type_u8[edge_lo:edge_hi]
    const = torch.where(t == SELF_LOOP, 2.0, torch.where((t == RESIDUAL) | (t == HEAD), 1.0, 0.0)).to(raw.dtype)
    is_const = const != 0
    raw.view(edge_hi - edge_lo, graph.max_feat_size, -1)[is_const, 0, :] = const[is_const].unsqueeze(1)


def edge_features(graph: NeuralGraph, scaled: torch.Tensor, edge_lo: int, edge_hi: int) -> torch.Tensor:
    """Raw edge features ``(edge_hi - edge_lo, F * C)`` of one CSR edge range (``to_edges`` restricted to it)."""
    F, C = graph.max_feat_size, scaled.shape[1]
    pos = graph.param_pos
    mine = ((pos >= edge_lo * F) & (pos < edge_hi * F)).nonzero().flatten()
    out = scaled.new_zeros((edge_hi - edge_lo) * F, C)
    out[pos[mine] - edge_lo * F] = scaled[mine]
    _put_constants(graph, out, edge_lo, edge_hi)
    return out.view(edge_hi - edge_lo, F * C)


# ---- communication and agreement --------------------------------------------------------------------------------
class _Comm:
    """All-reduces on one group: failures become :class:`CommError`, bytes are counted per collective."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.log: list[tuple[str, int]] = []

    def __call__(self, t: torch.Tensor, what: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        try:
            dist.all_reduce(t, op=op, group=self.group)
        except Exception as exc:  # a dead or hanging peer: gloo/NCCL raise after the group's timeout
            raise CommError(
                f"nowcast_sharded: rank {self.rank}/{self.world}: the all-reduce of {what} failed"
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

    def __init__(self, states: torch.Tensor, shard: ParamShard, full: bool, device, cast: bool = True):
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


def _validate(model, graph: NeuralGraph, states, k, shard: ParamShard) -> bool:
    """The checks of ``NiNoModel.nowcast`` on this process's part of the inputs; returns whether ``states`` is
    the full (n_params, ctx) history (else it is the shard's rows ``states[shard.ids]``). Finiteness is checked on
    this process's rows only (each process checks its own; full histories are compared by checksum), so that no
    (n_params, ctx) temporary is made."""
    if not isinstance(states, torch.Tensor) or states.dim() != 2:
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ValueError(f"nowcast_sharded: states must be a 2-D tensor, got {shape}")
    full = states.shape[0] == graph.num_params
    if states.shape[1] != model.ctx or not (full or states.shape[0] == shard.num_params):
        raise ValueError(
            f"nowcast_sharded: rank {shard.rank}: states has shape {tuple(states.shape)}, expected the full history"
            f" ({graph.num_params}, {model.ctx}) or this shard's rows ({shard.num_params}, {model.ctx})"
        )
    if not full and not plan.supports(model):
        raise ValueError("nowcast_sharded: this model runs whole (not sharded): give the full history")
    if states.is_floating_point():
        rows = _Rows(states, shard, full, states.device, cast=False)
        bad = int(rows.per_tensor(lambda x, t: (~torch.isfinite(x)).sum(), len(graph.param_shapes)).sum())
        if bad:
            raise ValueError(f"NiNoModel: states contain {bad} NaN/Inf values")
    # the model's own dtype / k / graph checks, on a one-row view of the history and of the graph
    m = min(1, states.shape[0])
    one = copy.copy(graph)
    one.param_pos = graph.param_pos[:m]
    model._check_inputs(one, states[:m], k)
    return full


def _checksums(states: torch.Tensor) -> tuple[float, float]:
    """float64 sum and sum of |x| of ``states``, in row chunks (no float64 copy of the whole history)."""
    s = a = 0.0
    for i in range(0, states.shape[0], CHUNK):
        x = states[i : i + CHUNK].double()
        s += x.sum().item()
        a += x.abs_().sum().item()
    return s, a


def _agree_on_inputs(comm: _Comm, model, graph, states, k, full, error) -> None:
    """All processes check that they step the same graph with the same k (and, given full histories, the same
    history); a process whose inputs were invalid makes all of them raise ValueError."""
    sums = _checksums(states) if error is None and full else (0.0, 0.0)
    sig = torch.tensor(
        [
            float(error is not None),
            float(k) if isinstance(k, int) else -1.0,
            float(graph.num_edges),
            float(graph.num_params),
            float(graph.num_nodes),
            float(graph.max_feat_size),
            float(model.ctx),
            float(full),
            *sums,
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
    if not torch.equal(lo, hi):
        raise ValueError(
            f"nowcast_sharded: rank {comm.rank}/{comm.world}: the processes were given different states, k or "
            f"graphs (checksums min {lo[1:].tolist()} vs max {hi[1:].tolist()})"
        )


# ---- scaling ------------------------------------------------------------------------------------------------------
def _scales(comm: _Comm, rows: _Rows, graph: NeuralGraph, method: str, guard: _Guard) -> torch.Tensor | None:
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
            if rows.shard.num_params and int(rows.shard.ids[0]) == 0:
                t0 = next(t for t in range(T) if rows.shard.seg[t + 1] > rows.shard.seg[t])
                sc[:] = scale_stats(next(rows.chunks(t0))[2][:1], None, method)[:1]
            return sc

        return comm(guard(first, lambda: torch.zeros(1, 2, device=dev)), "the first parameter's range")
    return None


def _shift_scale(x: torch.Tensor, t: int, method: str, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of rows ``x`` (n, C) of tensor t: scalars, or (n, 1) for ``std-param``."""
    if scales is None:
        sc = scale_stats(x, None, method)
        return sc[:, :1], sc[:, 1:]
    sc = scales[0] if method == "min-max-param" else scales[t]
    return sc[0], sc[1]


# ---- the step -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def nowcast_sharded(
    model,
    graph: NeuralGraph,
    states: torch.Tensor,
    k: int,
    group=None,
    backend: str | None = None,
    stats: dict | None = None,
    shard: ParamShard | None = None,
) -> torch.Tensor:
    """``model.nowcast`` split over the processes of ``group``; every process gets the full (n_params,) result.

    Call it on every process with the same ``graph`` and ``k``, and either the same full history ``states``
    (n_params, ctx) or each process its own rows ``states[shard.ids]`` (``shard = param_shard(graph, rank,
    world)``, which may be passed in to skip recomputing it). ``stats``, if given, receives the bytes this process
    sent to all-reduces (``allreduce_bytes``, per collective in ``allreduce_log``) and its shard's size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "nowcast_sharded: torch.distributed is not initialised (use torchrun / init_process_group first)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm = _Comm(group, rank, world)
    device = model.device
    graph = graph_to(graph, device)
    error, full = None, True
    try:
        if shard is None or (shard.rank, shard.world) != (rank, world):
            shard = param_shard(graph, rank, world)
        full = _validate(model, graph, states, k, shard)
    except Exception as exc:  # agreed below: every process raises, none waits for the others in a collective
        error = exc
    _agree_on_inputs(comm, model, graph, states, k, full, error)

    P = graph.num_params
    result = torch.zeros(P + world, dtype=torch.float32, device=device)
    failure: Exception | None = None
    if not plan.supports(model):  # WNN+ (per-parameter, cheap) or a non-official GNN: rank 0 runs it whole
        if rank == 0:
            try:
                result[:P] = model.nowcast(graph, states, k, backend=backend).to(device)
            except Exception as exc:
                failure = exc
    else:
        failure = _sharded_step(comm, model, graph, states, k, backend, shard, full, result)
    if failure is not None:
        result[:P].zero_()
        result[P + rank] = _NAN if isinstance(failure, _NonFinite) else _EXC
    comm(result, "the prediction")
    release_cpu_buffers()
    codes = result[P:].tolist()
    if stats is not None:
        stats.update(
            allreduce_bytes=sum(b for _, b in comm.log),
            allreduce_log=comm.log,
            shard_nodes=shard.node_hi - shard.node_lo,
            shard_edges=shard.edge_hi - shard.edge_lo,
            shard_params=shard.num_params,
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


def _sharded_step(comm, model, graph, states, k, backend, shard, full, result) -> Exception | None:
    """This process's part of the step, written into ``result[shard.ids]``; returns its local exception (the
    process has then joined every remaining collective with zeros, see :class:`_Guard`)."""
    guard = _Guard()
    passes = len(model.gnn.edge_update)  # message passes whose aggregation the prediction uses: one all-reduce each
    done = [0]

    def combine(local_rows: torch.Tensor) -> torch.Tensor:
        agg = local_rows.new_zeros(graph.num_nodes, local_rows.shape[1])
        agg[shard.node_lo : shard.node_hi] = local_rows
        done[0] += 1
        return comm(agg, f"message pass {done[0]}")

    rows = _Rows(states, shard, full, model.device)
    scales = _scales(comm, rows, graph, model.scale_method, guard)
    guard(lambda: _predict(model, graph, rows, shard, scales, k, backend, combine, result), lambda: None)
    while done[0] < passes:  # the message passes this process did not reach
        combine(torch.zeros(shard.node_hi - shard.node_lo, model.hid, device=model.device))
    return guard.failure


def _predict(model, graph, rows: _Rows, shard: ParamShard, scales, k, backend, combine, result) -> None:
    """The folded plan's stages on this shard's edges (as ``plan.predict_deltas``, freeing node terms as soon as
    they are dead and running the head in small chunks), then residual and unscaling of its parameters."""
    method, dev = model.scale_method, model.device
    n0, n1, e0, e1, F = shard.node_lo, shard.node_hi, shard.edge_lo, shard.edge_hi, graph.max_feat_size
    C, n, T = rows.states.shape[1], shard.num_params, len(graph.param_shapes)
    # 1. the shard's scaled history, straight into its edges' raw features; the last column kept for the residual
    raw = torch.zeros((e1 - e0) * F, C, dtype=torch.float32, device=dev)
    last = torch.empty(n, dtype=torch.float32, device=dev)
    for t in range(T):
        for a, b, x in rows.chunks(t):
            s = scale_rows(x, *_shift_scale(x, t, method, scales))
            raw[shard.pos[a:b]] = s
            last[a:b] = s[:, -1]
    _put_constants(graph, raw, e0, e1)
    raw = raw.view(e1 - e0, F * C)
    # 2. the plan's stages; only edges with parameters get the head
    used = torch.zeros(e1 - e0, F, dtype=torch.bool, device=dev)
    used.view(-1)[shard.pos] = True
    used = (used.any(1) if F > 1 else used.squeeze(1)).nonzero().flatten().to(shard.pos.dtype)
    sh, fw = plan.Shard(n0, n1, e0, e1), model._folded(F * C)
    x0, nd, ns = plan.layer0_nodes(model, graph)
    agg = combine(plan.film_rows(graph, raw, sh, nd, ns, fw, backend))
    del nd, ns
    l1 = plan.after_layer0(model, x0, agg)
    del x0, agg
    agg = combine(plan.edge_film_rows(graph, raw, sh, l1, fw, backend))
    hd = plan.after_layer1(model, graph, l1, agg, k)
    del l1, agg
    pred = torch.zeros(e1 - e0, F, dtype=torch.float32, device=dev)  # per edge slot (0 where no parameter)
    chunk = HEAD_EDGES if dev.type == "cpu" else max(1, used.numel())  # (GPUs: head_rows' own large chunks)
    for i in range(0, used.numel(), chunk):
        ids = used[i : i + chunk]
        pred[ids] = plan.head_rows(graph, raw, sh, ids, hd, fw, backend)
    del raw, hd, used
    delta = pred.view(-1)[shard.pos]
    del pred
    # 3. residual, finiteness, unscaling: the float32 operations of ``NiNoModel._finish``
    out = last + delta * model.upd_scale if model.residual else delta
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise _NonFinite(f"the prediction has {bad} NaN/Inf values")
    for t in range(T):
        if method != "std-param":
            a, b = shard.seg[t], shard.seg[t + 1]
            out[a:b] = unscale_rows(out[a:b], *_shift_scale(None, t, method, scales))
            continue
        for a, b, x in rows.chunks(t):  # each row's own statistics, recomputed from its history
            shift, scale = _shift_scale(x, t, method, scales)
            out[a:b] = unscale_rows(out[a:b], shift.squeeze(1), scale.squeeze(1))
    result[shard.ids] = out
