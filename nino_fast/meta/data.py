"""Training windows from a trajectory store, batched as one disconnected CSR graph.

A sample (the official sampler's recipe, on our store): pick a run, a start row, and take ``ctx + K`` rows
``stride`` apart (``stride = stride_steps / save_every``; targets may be cut short near the end of the run, but
at least ``min(K, 2 ctx)`` are kept). From that trajectory, ``samples_per_traj`` windows shifted by one row each:
inputs ``x`` = ctx rows, targets ``y`` = the following rows (K at most; fewer are masked; unlike the official
sampler, a shifted window keeps all K targets when the run has them). Both are scaled with
the per-tensor mean/std of ``x`` (:func:`nino_fast.scaling.scale_params`, 'std'); the learning target is the
scaled change ``y - x[:, -1]`` for horizons k = 1..K. The graph's Laplacian positional encoding gets a random
sign per eigenvector (the same for the windows of one trajectory), as officially: eigenvector signs are
arbitrary.

A :class:`Batch` concatenates the windows' graphs (node and edge indices offset): CSR ``rowptr``/``src``/``dst``,
edge types, LPE, raw edge features ``(E, F * ctx)`` zero-padded to the batch's largest F, and the edges whose
prediction the loss needs, split into those with one feature slot (U1 edges: K outputs) and those with F (U9
edges: F * K outputs). The prediction matrix is ``(R, K)``, ``R = U1 + U9 * F`` rows in that order; targets and
masks are stored in the same row order (so the loss needs no gather), and ``row_of_param`` maps parameters to
rows.

A :class:`ParamBatch` (for the WNN+ MLP, which sees each parameter alone) is the same windows without a graph:
the scaled histories ``(P, ctx)`` of all parameters of all windows, each parameter's edge type, targets and masks
``(P, K)``.

Graphs are built with the run's :func:`nino_fast.meta.tasks.graph_args` (a transformer's ``arch`` and heads;
generic for MLPs and ConvNets), read from the manifest entry or derived from its spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..graph import build_graph
from ..scaling import EPS
from . import tasks
from .store import TrajectoryStore


@dataclass
class GraphInfo:
    """Per-architecture constants (cached): the graph and its parameter -> (edge, slot) map."""

    graph: object
    edge_of_param: torch.Tensor  # (P,) CSR edge of each parameter
    slot_of_param: torch.Tensor  # (P,) feature slot of each parameter
    single: torch.Tensor  # edges carrying parameters in slot 0 only (sorted)
    multi: torch.Tensor  # edges carrying parameters in other slots too (sorted)
    row_of_param: torch.Tensor  # (P,) row of the (len(single) + len(multi) * F, K) prediction matrix
    sizes: torch.Tensor | None = None  # (T,) parameters per tensor (set on first use)
    tensor_id: torch.Tensor | None = None  # (P,) tensor of each parameter


def graph_info(param_shapes, lpe: int = 8, graph_args: dict | None = None) -> GraphInfo:
    """The graph of a ``(name, shape)`` list (``graph_args``: :func:`~nino_fast.build_graph`'s ``arch`` and
    heads) and its parameter -> (edge, slot, prediction row) maps; ``lpe=0``: no Laplacian encoding (WNN+)."""
    g = build_graph([(n, tuple(s)) for n, s in param_shapes], lpe=lpe, **(graph_args or {}))
    F = g.max_feat_size
    edge, slot = torch.div(g.param_pos, F, rounding_mode="floor"), g.param_pos % F
    is_multi = torch.zeros(g.num_edges, dtype=torch.bool)
    is_multi[edge[slot > 0]] = True
    used = torch.zeros(g.num_edges, dtype=torch.bool)
    used[edge] = True
    single, multi = (used & ~is_multi).nonzero().flatten(), (used & is_multi).nonzero().flatten()
    pos = torch.full((g.num_edges,), -1, dtype=torch.long)
    pos[single] = torch.arange(single.numel())
    pos[multi] = torch.arange(multi.numel())
    row = torch.where(is_multi[edge], single.numel() + pos[edge] * F + slot, pos[edge])
    return GraphInfo(g, edge, slot, single, multi, row)


@dataclass
class Batch:
    rowptr: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_type: torch.Tensor
    lpe: torch.Tensor
    pos_w: torch.Tensor
    raw: torch.Tensor  # (E, F * ctx) scaled history, zero-padded slots
    max_feat_size: int  # F of the batch
    single: torch.Tensor  # (U1,) edges predicted with slot 0 only
    multi: torch.Tensor  # (U9,) edges predicted with all F slots
    row_of_param: torch.Tensor  # (P,) row in the (R, K) prediction matrix, R = U1 + U9 * F
    target: torch.Tensor  # (R, K) scaled delta y_k - x_last, in row order
    mask: torch.Tensor  # (R, K) float 1/0: a parameter's available horizon
    num_graphs: int

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.src.numel()


@dataclass
class ParamBatch:
    """Windows for the WNN+ MLP: every parameter of every window is one row."""

    x: torch.Tensor  # (P, ctx) scaled history
    edge_type: torch.Tensor  # (P,) type of the edge carrying the parameter
    target: torch.Tensor  # (P, K) scaled delta y_k - x_last (0 where unavailable)
    mask: torch.Tensor  # (P, K) float 1/0: a parameter's available horizon
    num_graphs: int


def make_param_batch(samples: list[tuple], K: int) -> ParamBatch:
    """Concatenate ``(info, lpe_signs, x (P, ctx) scaled, target (P, L <= K))`` samples into a ParamBatch."""
    xs, types, targets, masks = [], [], [], []
    for info, _, x, tgt in samples:
        xs.append(x)
        types.append(info.graph.edge_type[info.edge_of_param])
        pad = torch.zeros(x.shape[0], K)
        pad[:, : tgt.shape[1]] = tgt
        targets.append(pad)
        masks.append((torch.arange(K) < tgt.shape[1]).float().expand(x.shape[0], K))
    return ParamBatch(
        x=torch.cat(xs),
        edge_type=torch.cat(types),
        target=torch.cat(targets),
        mask=torch.cat(masks),
        num_graphs=len(samples),
    )


def make_batch(samples: list[tuple], ctx: int, K: int) -> Batch:
    """Concatenate ``(info, lpe_signs (1, k), x (P, ctx) scaled, target (P, L <= K))`` samples into a Batch."""
    F = max(info.graph.max_feat_size for info, *_ in samples)
    n_single = sum(info.single.numel() for info, *_ in samples)
    n_rows = n_single + F * sum(info.multi.numel() for info, *_ in samples)
    n_edges = sum(info.graph.num_edges for info, *_ in samples)
    raw = torch.zeros(n_edges, F * ctx)
    target = torch.zeros(n_rows, K)
    valid = torch.zeros(n_rows, dtype=torch.long)  # horizons available per row (0: no parameter)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("src", "dst", "et", "lpe", "pos_w", "s", "m", "r")}
    parts["rowptr"] = [torch.zeros(1, dtype=torch.long)]
    n_off = e_off = r1_off = r9_off = 0
    for info, signs, x, tgt in samples:
        g = info.graph
        Fg = g.max_feat_size
        parts["rowptr"].append(g.rowptr[1:] + e_off)
        parts["src"].append(g.src.long() + n_off)
        parts["dst"].append(g.dst.long() + n_off)
        parts["et"].append(g.edge_type)
        parts["lpe"].append(g.lpe * signs)
        parts["pos_w"].append(g.pos_w)
        raw[e_off : e_off + g.num_edges, : Fg * ctx] = g.to_edges(x)
        parts["s"].append(info.single + e_off)
        parts["m"].append(info.multi + e_off)
        # rows: this sample's single edges after the previous samples' ones; multi rows after all single rows
        k1, local = info.single.numel(), info.row_of_param
        multi_row = n_single + r9_off + (local - k1) // Fg * F + (local - k1) % Fg
        rows = torch.where(local >= k1, multi_row, r1_off + local)
        target[:, : tgt.shape[1]].index_copy_(0, rows, tgt)
        valid[rows] = tgt.shape[1]
        parts["r"].append(rows)
        n_off += g.num_nodes
        e_off += g.num_edges
        r1_off += k1
        r9_off += info.multi.numel() * F
    return Batch(
        rowptr=torch.cat(parts["rowptr"]),
        src=torch.cat(parts["src"]).to(torch.int32),
        dst=torch.cat(parts["dst"]).to(torch.int32),
        edge_type=torch.cat(parts["et"]),
        lpe=torch.cat(parts["lpe"]),
        pos_w=torch.cat(parts["pos_w"]),
        raw=raw,
        max_feat_size=F,
        single=torch.cat(parts["s"]),
        multi=torch.cat(parts["m"]),
        row_of_param=torch.cat(parts["r"]),
        target=target,
        mask=(torch.arange(K) < valid.unsqueeze(1)).float(),
        num_graphs=len(samples),
    )


def scale_windows(traj: torch.Tensor, tensor_id: torch.Tensor, sizes: torch.Tensor, ctx: int, n_windows: int):
    """Per-tensor 'std' scaling of the windows ``traj[:, s : s + ctx]``, s < n_windows, of a (P, T) trajectory.

    Returns (mean, sd), each (P, n_windows): the mean and unbiased std over all ``size * ctx`` values of the
    parameter's tensor in window s (:func:`nino_fast.scaling.scale_params` with 'std', all windows at once).
    """
    n_t = sizes.numel()
    win = traj.unfold(1, ctx, 1)[:, :n_windows]  # (P, W, ctx) view
    count = (sizes * ctx).to(traj.dtype).unsqueeze(1)
    mean = torch.zeros(n_t, n_windows).index_add_(0, tensor_id, win.sum(2)) / count
    mean_p = mean.index_select(0, tensor_id)
    sq = (win - mean_p.unsqueeze(2)).square_().sum(2)
    var = torch.zeros(n_t, n_windows).index_add_(0, tensor_id, sq) / (count - 1).clamp_min(1)
    return mean_p, var.sqrt_().index_select(0, tensor_id)


class WindowSampler:
    """Draws training batches from a store with its own ``torch.Generator`` (state saved for exact resumption).

    Args:
        store: a :class:`TrajectoryStore` or its path.
        ctx, K: input states and horizons (5 and 40, as the official checkpoints).
        stride_steps: optimizer steps between consecutive input states (the NiNo period / ctx it targets).
        samples_per_traj: windows per drawn trajectory, shifted by one state each.
        lpe: Laplacian eigenvectors per graph (the model's ``lpe``; 0 for WNN+).
        runs: only these run ids (default: all); max_params: only runs of models with at most this many
            parameters (the cost of a training step grows with the edges of its windows).
    """

    def __init__(
        self, store, ctx=5, K=40, stride_steps=40, samples_per_traj=4, lpe=8, seed=0, runs=None, max_params=None
    ):
        if not isinstance(store, TrajectoryStore) and not (Path(store) / "manifest.json").is_file():
            raise ValueError(
                f"WindowSampler: {store} is not a trajectory store (no manifest.json; `nino-fast collect` makes one)"
            )
        self.store = store if isinstance(store, TrajectoryStore) else TrajectoryStore(store)
        self.ctx, self.K, self.spt, self.lpe = ctx, K, samples_per_traj, lpe
        self.gen = torch.Generator().manual_seed(seed)
        self.runs, self.strides = [], {}
        min_len = ctx + min(K, 2 * ctx) + samples_per_traj - 1
        for rid, e in sorted(self.store.runs.items()):
            if e.get("diverged") or (runs is not None and rid not in runs):
                continue
            if max_params is not None and sum(math.prod(sh) for _, sh in e["param_shapes"]) > max_params:
                continue
            if stride_steps % e["save_every"]:
                raise ValueError(
                    f"WindowSampler: stride_steps={stride_steps} is not a multiple of run {rid}'s "
                    f"save_every={e['save_every']}"
                )
            stride = stride_steps // e["save_every"]
            if (e["n_states"] - 1) // stride + 1 >= min_len:
                self.runs.append(rid)
                self.strides[rid] = stride
        if not self.runs:
            raise ValueError(
                f"WindowSampler: no run in {self.store.root} is long enough ({min_len} states at stride "
                f"{stride_steps} steps)"
            )
        self._info: dict[tuple, GraphInfo] = {}

    def info(self, rid: str) -> GraphInfo:
        e = self.store.runs[rid]
        shapes, args = e["param_shapes"], e.get("graph_args") or tasks.graph_args(e["spec"])
        key = (tuple((n, tuple(s)) for n, s in shapes), tuple(sorted(args.items())))
        if key not in self._info:
            self._info[key] = graph_info(shapes, self.lpe, args)
        return self._info[key]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.gen))

    def trajectory(self, rid: str) -> list[tuple]:
        """``samples_per_traj`` windows ``(info, lpe_signs, x scaled (P, ctx), target (P, L))`` of one random
        stretch of run ``rid``."""
        e, stride, ctx, K = self.store.runs[rid], self.strides[rid], self.ctx, self.K
        n = e["n_states"]
        need = (ctx + min(K, 2 * ctx) + self.spt - 1) * stride  # rows spanned by the shortest allowed window
        start = self._randint(max(1, n - need))
        rows = list(range(start, n, stride))[: ctx + K + self.spt - 1]
        traj = self.store.states(rid, rows).t().contiguous()  # (P, T)
        info = self.info(rid)
        if info.tensor_id is None:
            sizes = torch.tensor([math.prod(sh) for _, sh in info.graph.param_shapes])
            info.sizes, info.tensor_id = sizes, torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        mean, sd = scale_windows(traj, info.tensor_id, info.sizes, ctx, self.spt)
        inv = 1.0 / (sd + EPS)
        n_vec = 0 if info.graph.lpe is None else info.graph.lpe.shape[1]
        signs = (torch.randint(0, 2, (1, n_vec), generator=self.gen) * 2 - 1).float()
        out = []
        for s in range(self.spt):
            x = (traj[:, s : s + ctx] - mean[:, s : s + 1]) * inv[:, s : s + 1]
            # scaled y_k - scaled x_last = (y_k - x_last) / sd: the mean cancels
            target = (traj[:, s + ctx : s + ctx + K] - traj[:, s + ctx - 1 : s + ctx]) * inv[:, s : s + 1]
            out.append((info, signs, x, target))
        return out

    def _samples(self, batch: int) -> list[tuple]:
        samples = []
        for _ in range(batch):
            samples += self.trajectory(self.runs[self._randint(len(self.runs))])
        return samples

    def sample(self, batch: int) -> Batch:
        """A batch of ``batch`` trajectories x ``samples_per_traj`` windows, as one graph (NiNo)."""
        return make_batch(self._samples(batch), self.ctx, self.K)

    def sample_params(self, batch: int) -> ParamBatch:
        """The windows :meth:`sample` would draw (same generator use, for the same ``lpe``) as per-parameter rows
        (WNN+)."""
        return make_param_batch(self._samples(batch), self.K)
