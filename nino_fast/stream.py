"""The memory-bounded NiNo step: the folded plan (:mod:`nino_fast.plan`) streamed over destination-row tiles.

Beyond its inputs (the graph, the (P, C) history, the model) and its (P,) output, the step holds

- a slot -> parameter map, (E * F,) int32 (4 bytes per edge slot; the inverse of ``graph.param_pos``),
- at most 6 node terms of (N, D) float32 (pass 1: x0, agg and layer 0's two projections; pass 2: x1, agg and four
  projections; a node update hands its inputs over and frees them once concatenated: 6 at its peak),
- per tile of destination rows: the tile's raw edge features (E_t, F * C), scaled on the fly from ``states``,
  the kernels' small per-thread scratch and a few per-edge index/scale temporaries,
- optionally (when ``max_memory`` allows) the raw features of all edges, (E, F * C) float32.

No E x D edge state is ever stored. The fused plan recomputes each layer's edge states from the raw history
(E x F*C floats, 20 bytes per edge for transformers) instead of keeping them between layers: recomputing costs one
(D x F*C) GEMM per edge and pass (~1.3 kFLOP, ~1% of the step's ~105 kFLOP per edge: three D x D GEMMs), while
storing them would take D * 2 = 256 bytes per edge even in bf16 (29 GB for the 111M-parameter Llama) and would not
be exact.
Likewise the raw features themselves are either kept for all edges (when they fit in ``max_memory``: built once)
or rebuilt per tile and pass from the history (3 builds, a gather and an elementwise scaling: a few % of the step).

Exactness: every destination row lies in one tile, and the CPU kernels reduce each row in its own edge order
whatever the rows around it, so any tiling gives bitwise the same result on CPU, equal to the in-memory plan.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import plan
from ._extension import has_ext, release_cpu_buffers
from .finish import (
    NonFinitePrediction,  # noqa: F401  (re-exported: raised by nowcast_streamed)
    finish_history_reference,
    raise_if_bad,
)
from .graph.checks import check_int
from .graph.layout import HEAD, RESIDUAL, SELF_LOOP
from .graph.neural_graph import row_ranges
from .graph.pieces import GraphPart, RowRange
from .history import NonFiniteHistory
from .ops import dispatch
from .scaling import per_tensor, scale_stats, scaled_slot_rows

log = logging.getLogger(__name__)
DEFAULT_CAP = 2 << 30  # default budget: half the available memory, at most 2 GiB (larger tiles gain nothing)
# (N, D) float32 node terms alive during an edge pass / during a node update: pass 2 holds x1, s0, t0, nd, ns and
# agg; layer 1's update holds s0, t0, [x1, agg] and their (N, 2D) concatenation, then s0, t0 and the new terms
NODE_PASS, NODE_PEAK = 6, 6
EDGE_BYTES_REFERENCE = 8 * 128 * 4  # the pure-PyTorch ops materialise a few (E_t, D) tensors per pass (D = 128)
PASSES = ("layer 0", "layer 1", "head")
# per edge slot of a tile assembled from a layout: src, dst, type (9), parameter id and slot (8), the ids' sort
# (int64 keys and order: 24) and the slot -> parameter map (4), beyond the tile's other per-edge bytes
LAYOUT_EDGE_BYTES = 45
CHUNK = 1 << 18  # edges per chunk while building raw features / writing back predictions (bounds temporaries)
CHUNK_GPU = 1 << 24  # on a GPU: small chunks would be launch-bound (111M edges: thousands of launches)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_UNITS["ti"] = 2**40


def parse_memory(value, where: str = "max_memory") -> int:
    """Bytes from an int (bytes) or a string such as ``"6GB"`` (10^9), ``"6GiB"`` (2^30), ``"512 MB"``, ``"1.5G"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected bytes (int) or a string like '6GB', got {type(value).__name__}")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", value)
        if not m:
            raise ValueError(f"{where}: cannot parse {value!r}; expected e.g. '6GB', '6GiB', '512MB' or bytes")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: must be a positive number of bytes, got {value!r}")
    return int(value)


def available_memory(device: torch.device) -> int:
    """Free memory on ``device`` now: the CUDA allocator's free bytes, or Linux's MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_budget(device: torch.device) -> int:
    """``max_memory`` when none is given: half the available memory; on the CPU at most 2 GiB."""
    half = available_memory(device) // 2
    return half if device.type == "cuda" else min(half, DEFAULT_CAP)


def row_tiles(graph, max_edges: int, node_lo: int = 0, node_hi: int | None = None) -> list[RowRange]:
    """Contiguous destination-row ranges of ``[node_lo, node_hi)`` with at most ``max_edges`` edges each (a row
    longer than that is a tile of its own)."""
    rowptr = graph.rowptr.cpu()
    node_hi = graph.num_nodes if node_hi is None else node_hi
    tiles, n0 = [], node_lo
    while n0 < node_hi:
        e0 = int(rowptr[n0])
        n1 = int(torch.searchsorted(rowptr, e0 + max_edges, right=True)) - 1
        n1 = min(max(n1, n0 + 1), node_hi)
        tiles.append(RowRange(n0, n1, e0, int(rowptr[n1])))
        n0 = n1
    return tiles


class Budget:
    """How a step fits in ``budget`` bytes: tile size and whether the raw features of all edges are kept.

    ``budget`` None: the default, ``default`` bytes (e.g. :func:`default_budget`) or the least the step needs when
    that is more (what fits). Accounting (bytes): the slot -> parameter map (4 per edge slot) and one head
    chunk's temporaries always; ``NODE_PASS`` (N, D) node terms during an edge pass, ``NODE_PEAK`` during a node
    update (no tile alive then); per tile edge ``per_edge`` (its raw features and the index/scaling temporaries
    of building them or of writing back the prediction). The raw features of all edges (4 * E * F * C) are kept
    when that still leaves tiles of at least ~1M edges, else rebuilt from the history in each pass.
    """

    def __init__(
        self,
        graph,
        width,
        hid,
        device,
        budget: int | None,
        reference: bool,
        where: str,
        sample: bool,
        default: int,
        layout: bool = False,
    ):
        E, N, F = graph.num_edges, graph.num_nodes, graph.max_feat_size
        self.per_edge = 8 * width + 48 * F + 32 + (EDGE_BYTES_REFERENCE * hid // 128 if reference else 0)
        self.per_edge += 4 * width + 32 if sample else 0  # the sampled edges' copies and the draw
        if layout:  # a tile assembled per pass: its edge arrays, parameter ids and slots, history rows and map
            self.per_edge += LAYOUT_EDGE_BYTES * F + 4 * width + 16
        chunk = plan.HEAD_CHUNK if device.type == "cpu" else plan.HEAD_CHUNK_GPU
        node = 4 * N * hid
        # the slot -> parameter map of all edges (per tile for a layout) + one head chunk's temporaries
        self.fixed = (0 if layout else 4 * E * F) + min(chunk, E) * (4 * hid + 4 * width + 64)
        longest = int(graph.degree().max()) if N else 0
        need = max(self.fixed + NODE_PEAK * node, self.fixed + NODE_PASS * node + self.per_edge * longest)
        if budget is None:  # the default: ``default`` bytes, or what the step needs at least if that is more
            budget = max(default, need)
        if budget < need:
            raise ValueError(
                f"{where}: max_memory={budget} bytes is too small for this graph: the step needs at least {need} "
                f"bytes ({self.fixed} for the slot->parameter map and the head's buffers, {NODE_PEAK * node} for "
                f"node states, "
                f"{self.per_edge * longest} for a tile holding its longest destination row of {longest} edges)"
            )
        free = budget - self.fixed - NODE_PASS * node
        raw_all = 4 * E * width
        self.hold = not layout and free - raw_all >= self.per_edge * min(E, max(longest, 1 << 20))
        if self.hold:
            free -= raw_all
        self.tile_edges = max(longest, free // self.per_edge, 1)
        self.budget = budget


class History:
    """The scaled raw edge features of any edge range, computed from the (R, C) history rows on demand.

    By default the rows are the graph's parameters (R = P, row p = parameter p) with their own scales. One process
    of a sharded step (:mod:`nino_fast.distributed`) gives instead its part of the graph (``graph.param_pos``: the
    slots of the parameters on its edges), ``rows``: the row of ``states`` holding each of them (default: the same
    index; a process given the full history passes its parameters' ids), ``scales``: the statistics all processes
    agreed on ((T, 2) per tensor, or one (shift, scale) per row of ``states``; None: computed from ``states``) and
    ``ends``: (T,) the row index at which each parameter tensor's rows end (default: the cumulative sizes of
    ``graph.param_shapes``). ``out``: where :meth:`finish` writes parameter p of the graph in its result (default:
    p; a tile assembled from a :class:`~nino_fast.graph.pieces.GraphLayout` writes its parameters' ids).
    """

    def __init__(
        self,
        graph,
        states: torch.Tensor,
        method: str,
        device: torch.device,
        rows=None,
        scales=None,
        ends=None,
        out=None,
    ):
        self.graph, self.states, self.device, self.F = graph, states, device, graph.max_feat_size
        self.out = out
        P, E = graph.num_params, graph.num_edges
        idx = torch.int32 if P < 2**31 else torch.int64
        self.inv = torch.full((E * self.F,), -1, dtype=idx, device=device)  # edge slot -> parameter p of the graph
        for a in range(0, P, 1 << 22):
            b = min(P, a + (1 << 22))
            self.inv[graph.param_pos[a:b]] = torch.arange(a, b, dtype=idx, device=device)
        self.rows = None if rows is None else rows.to(device)  # parameter p of the graph -> its row of states
        self.per_tensor = per_tensor(method)
        if scales is None:
            scales = scale_stats(states, graph.param_shapes, method, torch.float32)
        self.scales = scales.to(device)
        if ends is None:
            sizes = torch.tensor([math.prod(s) for _, s in graph.param_shapes], dtype=torch.int64)
            ends = sizes.cumsum(0)
        self.ends = ends.to(device)  # parameter tensor t holds rows [ends[t-1], ends[t])

    def features(self, e0: int, e1: int) -> torch.Tensor:
        """(e1 - e0, F * C) float32: ``graph.to_edges(scale_params(states)[0])[e0:e1]``, bitwise. On the CPU one C++
        pass (``scaled_history``, spec :func:`nino_fast.scaling.scaled_history_reference`), else tensor ops in
        chunks of ``CHUNK`` edges, so that their index and scaling temporaries stay small beside the output."""
        F, C = self.F, self.states.shape[1]
        if self._native():  # one pass in C++, no temporaries
            slots = self.inv[e0 * F : e1 * F]
            out = torch.ops.nino_fast.scaled_history(self.states, slots, self.rows, self.scales, self._ends())
        else:
            out = self._features_chunked(e0, e1)
        # slot-0 constants of the structural edges (NeuralGraph.edge_constants): 2 on self-loops, 1 on
        # residual/head edges; they are few (about one per node), so index them
        t = self.graph.edge_type_u8[e0:e1]
        const = ((t == SELF_LOOP) | (t == RESIDUAL) | (t == HEAD)).nonzero().squeeze(1)
        value = torch.where(t[const] == SELF_LOOP, 2.0, 1.0).to(torch.float32)
        out.view(e1 - e0, F * C)[const, :C] = value.unsqueeze(1)
        return out.view(e1 - e0, F * C)

    def _features_chunked(self, e0: int, e1: int) -> torch.Tensor:
        """The scaled rows of :meth:`features` ((e1 - e0) * F, C) by tensor ops, ``CHUNK`` edges at a time."""
        F, C = self.F, self.states.shape[1]
        out = torch.zeros((e1 - e0) * F, C, dtype=torch.float32, device=self.device)
        chunk = CHUNK if self.device.type == "cpu" else CHUNK_GPU
        for a in range(e0, e1, chunk):
            b = min(e1, a + chunk)
            slots = self.inv[a * F : b * F]
            where, x = scaled_slot_rows(self.states, slots, self.rows, self.scales, self._ends())
            out[(a - e0) * F : (b - e0) * F].index_copy_(0, where, x)
            del slots, where, x
        return out

    def used_edges(self, e0: int, e1: int) -> torch.Tensor:
        """Positions within ``[e0, e1)`` of the edges that carry at least one parameter (sorted, int64)."""
        has = self.inv[e0 * self.F : e1 * self.F].view(e1 - e0, self.F) >= 0
        return (has.any(1) if self.F > 1 else has.squeeze(1)).nonzero().squeeze(1)

    def _native(self, *tensors) -> bool:
        """Whether the compiled CPU ops (scaled_history, finish_history_) run this history: everything on the CPU."""
        return has_ext() and self.device.type == "cpu" and all(t.device.type == "cpu" for t in (self.states, *tensors))

    def _ends(self) -> torch.Tensor | None:
        """The tensors' cumulative row counts where the scales are per tensor (None: per row)."""
        return self.ends if self.per_tensor else None

    def finish(self, e0: int, used, pred, model, result: torch.Tensor) -> int:
        """Residual, unscaling and write-back of the parameters on edges ``e0 + used`` with scaled deltas ``pred``
        (len(used), F) into ``result`` (one value per parameter of the graph, in ``param_pos`` order), by
        :func:`nino_fast.finish.finish_rows` as ``NiNoModel._finish`` does; returns the count of non-finite values.
        On the CPU one C++ pass (``finish_history_``), else its specification in chunks of ``CHUNK`` edges (small
        temporaries)."""
        native = self._native(result)
        F, bad = self.F, 0
        cols = torch.arange(F, device=self.device)
        if native:  # no temporaries to bound
            chunk = max(used.numel(), 1)
        else:
            chunk = CHUNK if self.device.type == "cpu" else CHUNK_GPU
        for a in range(0, used.numel(), chunk):
            ids = used[a : a + chunk] + e0
            slots = self.inv[ids] if F == 1 else self.inv[(ids * F).unsqueeze(1) + cols].flatten()
            args = (result, pred[a : a + chunk].flatten(), self.states, slots, self.rows, self.scales, self._ends())
            args += (self.out, bool(model.residual), float(model.upd_scale))
            bad += int(torch.ops.nino_fast.finish_history_(*args)) if native else finish_history_reference(*args)
        return bad


@dataclass(frozen=True)
class Sharded:
    """What one process of a sharded step (:mod:`nino_fast.distributed`) brings to the streamed step: ``part``, its
    piece of the graph (the step's ``graph`` is ``part.local``; it runs the rows ``part.rows``, the others are
    other processes' edges), ``combine``, which turns the (N, D) aggregation of its rows (zero elsewhere) into that
    of all nodes, ``full``: whether ``states`` holds every parameter's row (the part's being rows ``part.ids``) or
    the part's rows only, ``scales``: the statistics all processes agreed on (see :class:`History`), and
    ``share``."""

    part: GraphPart
    combine: Callable[[torch.Tensor], torch.Tensor]
    full: bool = True
    scales: torch.Tensor | None = None
    share: int = 1  # processes sharing this machine's memory: the default max_memory is divided among them

    def history(self, graph, states: torch.Tensor, method: str, device: torch.device) -> History:
        """The :class:`History` of the part's parameters in ``states`` (``graph``: the part's, on ``device``)."""
        part = self.part
        ends = None if self.full else torch.tensor(part.seg[1:], dtype=torch.int64)  # tensor t ends at seg[t+1]
        return History(graph, states, method, device, part.ids if self.full else None, self.scales, ends)


# what a step on a built graph holds per parameter of a transformer (about one edge each): the (P, 5) float32 history
# (20), the graph's src, dst, types and param_pos (17) and the slot -> parameter map (4)
IN_MEMORY_BYTES_PER_PARAM = 41


def in_memory_bytes(num_params: int, ctx: int) -> int:
    """About what a step on the built graph and the (P, ctx) float32 history holds (:func:`nowcast_layout` holds
    neither: the callers pick it when this would not fit)."""
    return num_params * (IN_MEMORY_BYTES_PER_PARAM + 4 * (ctx - 5))


def supports_layout(predictor) -> bool:
    """Whether ``predictor`` can run :func:`nowcast_layout` (a NiNo model with the folded plan)."""
    nino = isinstance(predictor, torch.nn.Module) and not getattr(predictor, "is_mlp", True)
    return nino and plan.supports(predictor)


def _progress_bar(enabled, total_edges: int, device: torch.device):
    """A tqdm bar over (pass, tile) edges, or None. ``enabled=None``: only for long steps on a terminal."""
    if enabled is None:  # a few seconds: ~2M edges on 2 CPU cores, ~200M on a GPU
        long_step = total_edges >= (2_000_000 if device.type == "cpu" else 200_000_000)
        enabled = long_step and sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(PASSES) * total_edges, unit="edge", unit_scale=True, desc="NiNo step", leave=False)


def nowcast_streamed(
    model,
    graph,
    states: torch.Tensor,
    k: int,
    backend=None,
    max_memory=None,
    progress=None,
    tile_edges=None,
    edge_sample_ratio: float = 0.0,
    edge_dtype: torch.dtype = torch.float32,
    part: Sharded | None = None,
    where: str = "NiNoModel.nowcast",
) -> torch.Tensor:
    """The folded NiNo step tile by tile: ``states`` (P, C) -> predicted parameters (P,) in ``states.dtype``.

    Called by ``NiNoModel.nowcast`` (inputs checked, graph on the model's device). ``max_memory`` bounds what the
    step allocates beyond its inputs and output (see the module docstring); ``tile_edges`` forces the tile size
    (tests). ``0 < edge_sample_ratio < 1``: the official approximation, each message pass aggregates over a random
    part of the edges (each edge kept with that probability, per pass; torch's global RNG); the edge updates and
    the head still run on every edge. ``edge_dtype``: dtype of the per-edge features given to the kernels (the
    raw features go in as two 16-bit halves, :func:`nino_fast.plan.split_raw`; see ``NiNoModel.nowcast``). Raises
    ValueError for a ``max_memory`` too small for the graph and :class:`NonFinitePrediction` for a non-finite
    prediction (``where`` names the caller in the messages).

    ``part``: run one process's part of a sharded step instead (:class:`Sharded`): its rows only, the aggregations
    combined after each message pass; the result holds the predictions of ``graph``'s parameters (the part's).
    """
    device, width = model.device, graph.max_feat_size * states.shape[1]
    fit = _fit(model, graph, width, backend, max_memory, edge_sample_ratio, part, where)
    method = model.scale_method
    hist = part.history(graph, states, method, device) if part else History(graph, states, method, device)
    rows = (part.part.node_lo, part.part.node_hi) if part else ()
    ranges = row_tiles(graph, tile_edges or fit.tile_edges, *rows)
    bar = _progress_bar(progress, graph.num_edges, device)
    tiles = _Tiles(graph, hist, ranges, fit.hold and tile_edges is None, edge_dtype, edge_sample_ratio, bar)
    result = torch.empty(graph.num_params, dtype=states.dtype, device=states.device)
    combine = part.combine if part else None
    times = _run(model, graph, k, tiles, _weights(model, width, edge_dtype), backend, combine, result, where)
    _log_stats(tiles, fit.budget, times)
    return result


@torch.no_grad()
def nowcast_layout(
    model,
    layout,
    history,
    k: int,
    backend=None,
    max_memory=None,
    progress=None,
    tile_edges=None,
    split: RankSplit | None = None,
    where: str = "nowcast_layout",
    state=None,
) -> torch.Tensor:
    """The folded NiNo step over a graph kept as its layout (:class:`~nino_fast.graph.pieces.GraphLayout`) on a
    history read tensor by tensor (:class:`~nino_fast.history.TensorHistory`): the predicted parameters (P,) in
    ``history.dtype``, on the CPU. Bitwise :func:`nowcast_streamed`'s result (any tiling): each tile's edges are
    assembled from the layout and its parameters' rows gathered from the history when a pass reaches it, so
    beyond the result, the (N, D) node terms and the history's kept tensors, memory is bounded by ``max_memory``
    (default: as :func:`nowcast_streamed`) whatever the size of the graph. Raises ValueError for a ``max_memory``
    too small for the graph's longest row, :class:`~nino_fast.history.NonFiniteHistory` for NaN/Inf in the
    history (before any GNN work) and :class:`NonFinitePrediction` for a non-finite prediction.

    ``split``: this process's share of a step run by several (:class:`RankSplit`): its rows' tiles only, the
    aggregations summed after each message pass, and the returned result summed over the processes (every
    process gets all predictions, bitwise those of one process at the same thread count).

    ``state``: a :class:`~nino_fast.resume.StepState` for this step (one process): what a previous, interrupted
    run of it finished is loaded instead of recomputed, and the result is its file (bitwise the same prediction)."""
    if state is not None and split is not None:
        raise ValueError(f"{where}: a step split over processes cannot resume (state is for one process)")
    device, width = model.device, layout.max_feat_size * history.ctx
    if not supports_layout(model):
        raise ValueError(f"{where}: needs a NiNo model with the official architecture (the folded plan)")
    if list(history.param_shapes) != list(layout.param_shapes):
        raise ValueError(f"{where}: the history's parameters are not the graph's")
    if history.ctx != model.ctx:
        raise ValueError(f"{where}: the history has {history.ctx} snapshots, the model takes ctx={model.ctx}")
    k = check_int(k, where, "k", 1, model.seq_len)
    model._check_graph(layout.nodes, where)  # LPE width, word positions, feature slots
    budget = None if max_memory is None else parse_memory(max_memory, f"{where}: max_memory")
    share = split.local if split else 1
    default = default_budget(device) // share
    fit = Budget(layout, width, model.hid, device, budget, False, where, False, default, layout=True)
    method = model.scale_method
    scales = _layout_scales(history, method, split)  # also the finiteness check, before any GNN work
    rows = row_ranges(layout.rowptr, split.world)[split.rank][:2] if split else ()
    ranges = row_tiles(layout, tile_edges or fit.tile_edges, *rows)
    bar = _progress_bar(progress, sum(r.edge_hi - r.edge_lo for r in ranges), device)
    tiles = _LayoutTiles(layout, history, scales, method, ranges, torch.float32, 0.0, bar, device)
    # a split step's parts are summed at the end: zeros where other processes' parameters go
    if state is not None:
        result = state.result(layout.num_params, history.dtype, [(r.edge_lo, r.edge_hi) for r in ranges])
    else:
        result = (torch.zeros if split else torch.empty)(layout.num_params, dtype=history.dtype)
    nodes = layout.nodes.to(device)
    combine = split.combine if split else None
    fw = _weights(model, width, torch.float32)
    times = _run(model, nodes, k, tiles, fw, backend, combine, result, where, state)
    _log_stats(tiles, fit.budget, times)
    if split:
        split.reduce(_bits(result))  # each value comes from one process, zeros from the others: exact
    return result


@dataclass(frozen=True)
class RankSplit:
    """One process's share of :func:`nowcast_layout`: the destination rows of part ``rank`` of ``world``
    (:func:`~nino_fast.graph.neural_graph.row_ranges`, ~E / world edges each). ``reduce``: an in-place sum over
    the processes (e.g. ``torch.distributed.all_reduce``); ``local``: processes sharing this machine's memory
    (the default ``max_memory`` is divided among them)."""

    rank: int
    world: int
    reduce: Callable[[torch.Tensor], object]
    local: int = 1

    def combine(self, agg: torch.Tensor) -> torch.Tensor:
        """The (N, D) aggregation of all processes' rows from this process's (zero elsewhere), in place."""
        self.reduce(agg)
        return agg


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as integers, so that a sum of disjoint parts (zeros elsewhere) is exact, -0.0 included."""
    flat = t.view(-1)
    return flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 else flat.view(torch.uint8)


def _layout_scales(history, method: str, split: RankSplit | None) -> torch.Tensor | None:
    """The history's statistics (see :meth:`~nino_fast.history.TensorHistory.scales`); a split step computes
    each tensor's on one process and sums them (as bits: exact), and every process raises if any found NaN/Inf."""
    if split is None:
        return history.scales(method)
    mine = range(split.rank, len(history.param_shapes), split.world)
    failure, scales = None, None
    try:
        scales = history.scales(method, mine)
    except NonFiniteHistory as exc:
        failure = exc
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32)
    split.reduce(flag)
    if int(flag) or failure is not None:
        raise failure or NonFiniteHistory("another process found NaN/Inf values in its part of the history")
    if scales is not None:
        split.reduce(_bits(scales))
    return scales


def _weights(model, width: int, edge_dtype) -> plan.Folded:
    """The folded weights for raw features of ``width`` columns (16-bit halves for a 16-bit ``edge_dtype``)."""
    fw = model._folded(width)
    return fw if edge_dtype == torch.float32 else plan.split_raw_weights(fw)  # see plan.split_raw


def _run(model, nodes, k: int, tiles: _Tiles, fw, backend, combine, result, where: str, state=None) -> list[float]:
    """:func:`_run_passes`, then the kernels' buffers and the tiles' kept data let go (also on errors), and
    :class:`NonFinitePrediction` for NaN/Inf predictions; returns the passes' end times."""
    try:
        bad, times = _run_passes(model, nodes, k, tiles, fw, backend, combine, result, state)
    finally:
        tiles.close()
        release_cpu_buffers()
    raise_if_bad(bad, where)
    return times


def _fit(model, graph, width: int, backend, max_memory, edge_sample_ratio: float, part, where: str) -> Budget:
    """The step's :class:`Budget` for ``max_memory`` (None: the default, a process's share of it for a part)."""
    device = model.device
    budget = None if max_memory is None else parse_memory(max_memory, f"{where}: max_memory")
    reference = dispatch.resolve(device, backend) == "reference"
    sample = 0.0 < edge_sample_ratio < 1.0
    default = default_budget(device) // (part.share if part else 1)
    return Budget(graph, width, model.hid, device, budget, reference, where, sample, default)


def _log_stats(tiles: _Tiles, budget: int, times: list[float]) -> None:
    ranges = tiles.ranges
    stats = dict(
        tiles=len(ranges),
        tile_edges=max(sh.edge_hi - sh.edge_lo for sh in ranges) if ranges else 0,
        raw_held=tiles.held is not None,
        budget=budget,
        pass_s=[times[i + 1] - times[i] for i in range(len(times) - 1)],
    )
    log.debug(
        "streamed NiNo step: %d tiles of <= %d edges, raw features %s, passes %s s",
        stats["tiles"],
        stats["tile_edges"],
        "kept" if stats["raw_held"] else "rebuilt per pass",
        " / ".join(f"{t:.2f}" for t in stats["pass_s"]),
        extra={"nino_stats": stats},
    )


class _Tile(NamedTuple):
    """One tile as a pass reads it: the graph holding its edges (the whole graph, or the tile's assembled piece),
    its rows in that graph's edge numbering, the :class:`History` of its parameters and its raw edge features."""

    graph: object
    rows: RowRange
    hist: History
    raw: torch.Tensor


class _Tiles:
    """The destination-row tiles of a streamed step over a graph in memory and what each pass reads per tile: its
    raw edge features (built from the history, or kept from the first pass when the budget allows), the edges a
    message pass samples (the official ``edge_sample_ratio``) and the progress bar."""

    def __init__(self, graph, hist: History, ranges: list[RowRange], hold: bool, edge_dtype, ratio: float, bar):
        self.graph, self.hist, self.ranges, self.edge_dtype = graph, hist, ranges, edge_dtype
        self.ratio, self.bar, self.device = ratio, bar, None if hist is None else hist.device
        self.held: list[torch.Tensor | None] | None = [] if hold else None

    def open(self, i: int, last: bool = False) -> _Tile:
        """Tile ``i`` (``last``: for the last pass over it, a kept copy of its features is let go)."""
        sh = self.ranges[i]
        if self.held is not None and i < len(self.held):
            raw = self.held[i]
        else:
            raw = self._raw(self.hist, sh.edge_lo, sh.edge_hi)
            if self.held is not None:
                self.held.append(raw)
        if last and self.held is not None:
            self.held[i] = None
        return _Tile(self.graph, sh, self.hist, raw)

    def _raw(self, hist: History, e0: int, e1: int) -> torch.Tensor:
        """(e1 - e0, F * C) raw features (16-bit halves for a 16-bit ``edge_dtype``)."""
        raw = hist.features(e0, e1)
        return raw if self.edge_dtype == torch.float32 else plan.split_raw(raw, self.edge_dtype)

    def keep(self, sh: RowRange) -> torch.Tensor | None:
        """The edges of ``sh`` a message pass aggregates over (None: all); drawn per pass from torch's global RNG."""
        if not 0.0 < self.ratio < 1.0:
            return None
        return (torch.rand(sh.edge_hi - sh.edge_lo, device=self.device) < self.ratio).nonzero().squeeze(1)

    def advance(self, name: str, sh: RowRange) -> None:
        if self.bar is not None:
            self.bar.set_description(f"NiNo step, {name}")
            self.bar.update(sh.edge_hi - sh.edge_lo)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _LayoutTiles(_Tiles):
    """The tiles of a step over a :class:`~nino_fast.graph.pieces.GraphLayout`: each time a pass opens a tile, its
    edges are assembled from the layout and its parameters' history rows gathered from a
    :class:`~nino_fast.history.TensorHistory` (nothing O(E) is kept between tiles)."""

    def __init__(self, layout, history, scales, method: str, ranges, edge_dtype, ratio: float, bar, device):
        super().__init__(None, None, ranges, False, edge_dtype, ratio, bar)
        self.layout, self.history, self.scales, self.method, self.device = layout, history, scales, method, device
        if method == "min-max-param":  # every parameter scaled by the first one's range
            self.first = scale_stats(history.first_row(), None, method, torch.float32)[:1]

    def open(self, i: int, last: bool = False) -> _Tile:
        sh = self.ranges[i]
        piece, ids = self.layout.piece(sh.node_lo, sh.node_hi)
        seg = self.history.segments(ids)
        states = self.history.gather(ids, seg)
        scales = self.scales
        if scales is None:  # per-parameter methods: each row's own statistics
            scales = self.first.expand(states.shape[0], 2) if self.method == "min-max-param" else None
        ends = torch.tensor(seg[1:], dtype=torch.int64)
        piece = piece.to(self.device)
        hist = History(piece, states, self.method, self.device, scales=scales, ends=ends, out=ids.to(self.device))
        rows = RowRange(sh.node_lo, sh.node_hi, 0, sh.edge_hi - sh.edge_lo)
        return _Tile(piece, rows, hist, self._raw(hist, 0, rows.edge_hi))

    def close(self) -> None:
        super().close()
        self.history.release()


def _aggregation(model, graph, sharded: bool) -> torch.Tensor:
    """An (N, D) aggregation to fill tile by tile; zero for a process's part (its rows only are filled)."""
    new = torch.zeros if sharded else torch.empty
    return new(graph.num_nodes, model.hid, dtype=torch.float32, device=model.device)


def _layer0_pass(model, nodes, tiles: _Tiles, fw, backend, combine) -> list[torch.Tensor]:
    """Layer 0's message pass: ``[x0, agg0]``, the inputs of its node update (the layer's node terms freed)."""
    x0, nd, ns = plan.layer0_nodes(model, nodes)
    agg = _aggregation(model, nodes, combine is not None)
    for i, sh in enumerate(tiles.ranges):
        tile = tiles.open(i)
        agg[sh.node_lo : sh.node_hi] = plan.film_rows(
            tile.graph, tile.raw, tile.rows, nd, ns, fw, backend, tiles.keep(sh)
        )
        del tile
        tiles.advance(PASSES[0], sh)
    return [x0, agg if combine is None else combine(agg)]


def _layer1_pass(model, nodes, l1: plan.Layer1, tiles: _Tiles, fw, backend, combine) -> torch.Tensor:
    """Edge update 0 and layer 1's message pass: layer 1's (N, D) aggregation."""
    agg = _aggregation(model, nodes, combine is not None)
    for i, sh in enumerate(tiles.ranges):
        tile = tiles.open(i)
        agg[sh.node_lo : sh.node_hi] = plan.edge_film_rows(
            tile.graph, tile.raw, tile.rows, l1, fw, backend, tiles.keep(sh)
        )
        del tile
        tiles.advance(PASSES[1], sh)
    return agg if combine is None else combine(agg)


def _head_pass(model, hd: plan.Head, tiles: _Tiles, fw, backend, result: torch.Tensor, state=None) -> int:
    """Edge update 1, the head and the finish of every tile's parameters, written into ``result``; returns the
    count of non-finite predictions. ``state`` (:class:`~nino_fast.resume.StepState`): the tiles a previous run
    wrote are skipped, and each tile is recorded as written when it is."""
    start, bad = state.head_progress() if state else (0, 0)
    for i, sh in enumerate(tiles.ranges):
        if i < start:
            tiles.advance(PASSES[2], sh)
            continue
        tile = tiles.open(i, last=True)
        e0, e1 = tile.rows.edge_lo, tile.rows.edge_hi
        used = tile.hist.used_edges(e0, e1)
        pred = plan.head_rows(tile.graph, tile.raw, tile.rows, used, hd, fw, backend)
        bad += tile.hist.finish(e0, used, pred, model, result)
        del tile, pred
        if state:
            state.head_done(i + 1, bad)
        tiles.advance(PASSES[2], sh)
    return bad


def _run_passes(model, nodes, k: int, tiles: _Tiles, fw, backend, combine, result, state=None) -> tuple[int, list]:
    """The folded plan's stages over ``tiles``, the predictions written into ``result``: ``(bad, times)``, the
    non-finite count and the passes' end times. ``nodes``: the graph whose node arrays (LPE, word positions) the
    node terms read; ``combine``: None (one process) or what turns a process's rows of an aggregation into all
    nodes'. Each (N, D) node term is handed over (no reference kept here), so that the node updates free it as
    soon as they can. ``state`` (:class:`~nino_fast.resume.StepState`): each message pass's aggregation is saved
    when it ends and loaded instead of recomputed when a previous run saved it; the head pass resumes at its
    first unwritten tile."""
    times = [time.perf_counter()]
    agg0 = _resumed(state, "agg0", tiles, PASSES[0], model.device)
    if agg0 is None:
        inputs = _layer0_pass(model, nodes, tiles, fw, backend, combine)
        _save(state, "agg0", inputs[1])
    else:
        inputs = [plan.layer0_nodes(model, nodes)[0], agg0]
    l1 = plan.after_layer0(model, inputs)
    release_cpu_buffers()  # the kernels' cached output buffers: reused within a pass, freed after it
    times.append(time.perf_counter())
    agg1 = _resumed(state, "agg1", tiles, PASSES[1], model.device)
    if agg1 is None:
        agg1 = _layer1_pass(model, nodes, l1, tiles, fw, backend, combine)
        _save(state, "agg1", agg1)
    inputs = [l1.x1, agg1]
    del agg1
    release_cpu_buffers()
    times.append(time.perf_counter())
    l1 = l1._replace(x1=None, nd=None, ns=None)  # layer 1's message terms: not needed by the node update
    hd = plan.after_layer1(model, nodes, l1, inputs, k)
    del l1
    bad = _head_pass(model, hd, tiles, fw, backend, result, state)
    times.append(time.perf_counter())
    return bad, times


def _resumed(state, name: str, tiles: _Tiles, pass_name: str, device) -> torch.Tensor | None:
    """The aggregation a previous run of this step saved as ``name`` (its pass skipped), or None."""
    agg = state.load(name) if state is not None else None
    if agg is None:
        return None
    for sh in tiles.ranges:
        tiles.advance(pass_name, sh)
    log.info("streamed NiNo step: %s loaded from %s (pass skipped)", name, state.root)
    return agg.to(device)


def _save(state, name: str, agg: torch.Tensor) -> None:
    if state is not None:
        state.save(name, agg)


# ---- the official per-block subgraph approximation -----------------------------------------------------------
BLOCK_NAMES = {  # the official NiNo.set_model's block names
    "gpt2": "transformer.h.",
    "bert": "encoder.layer.",
    "llama": "model.layers.",
    "qwen3": "model.layers.",
    "vit": "encoder.layers.encoder_layer_",
}


def split_blocks(param_shapes, arch: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The official ``subgraph`` split: a new part at each transformer block, parameters before the first block
    with block 0 and those after the last with the last block; one part for architectures without blocks."""
    block_name = BLOCK_NAMES.get(arch)
    if block_name is None:
        return [list(param_shapes)]
    parts: list[list[tuple[str, tuple[int, ...]]]] = []
    part: list[tuple[str, tuple[int, ...]]] = []
    block = prev = 0
    for name, shape in param_shapes:
        if block_name in name:
            block = int(name.split(block_name)[-1].split(".")[0])
        if block > prev:
            parts.append(part)
            part, prev = [], block
        part.append((name, shape))
    if part:
        parts.append(part)
    return parts


def nowcast_subgraphs(model, graph, states: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """The step on one neural graph per transformer block (the official ``subgraph=True``; an approximation: no
    message crosses blocks, each part has its own LPE). Parts are built one at a time, so the graph memory is one
    block's; each part costs a graph build (and an LPE, cached on disk for large parts) per step."""
    from .graph import build_graph

    parts = split_blocks(graph.param_shapes, graph.arch)
    if len(parts) == 1:  # no transformer blocks: the whole graph, as officially
        return nowcast_streamed(model, graph, states, k, **kwargs)
    result = torch.empty(graph.num_params, dtype=states.dtype, device=states.device)
    lpe = model.lpe if graph.lpe is not None else 0
    off = 0
    for part in parts:
        heads = dict(num_heads=graph.meta.get("num_heads"), num_key_value_heads=graph.meta.get("num_key_value_heads"))
        sub = build_graph(part, arch=graph.arch, lpe=lpe, **heads).to(model.device)
        n = sub.num_params
        result[off : off + n] = nowcast_streamed(model, sub, states[off : off + n], k, **kwargs)
        off += n
        del sub
    return result
