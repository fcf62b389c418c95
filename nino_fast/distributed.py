"""Sharded NiNo inference over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each of P processes owns a contiguous range of destination nodes holding ~E/P edges (CSR rows), and computes the
edge work of its range only: edge features, the fused message passes, the edge updates and the output head of its
parameters. Node states (N x D) are replicated: after each message pass the processes exchange their rows of the
aggregation with one all-reduce of an (N, D) buffer (each row is non-zero on exactly one process, so the sum is
exact and the result identical to one process), i.e. O(N * D) bytes per layer; the predicted parameter changes are
combined with one all-reduce of a (P_params,) vector. Every process ends with the same parameters.

Failures: inputs that differ across processes raise ``ValueError`` on all of them before any work; a process
that dies or does not answer within the process group's timeout (``init_process_group(timeout=...)``) makes the
others raise ``RuntimeError`` naming the step — never a hang beyond that timeout, and the caller's parameters are
only ever written after the whole step succeeded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .graph import NeuralGraph
from .plan import Shard
from .scaling import scale_params


def shard_bounds(graph: NeuralGraph, world: int) -> list[tuple[int, int, int, int]]:
    """``world`` contiguous (node_lo, node_hi, edge_lo, edge_hi) ranges with about E / world edges each."""
    rowptr = graph.rowptr
    targets = torch.tensor([round(graph.num_edges * i / world) for i in range(world + 1)], dtype=torch.int64)
    nodes = torch.searchsorted(rowptr, targets).clamp(max=graph.num_nodes)
    nodes[0], nodes[-1] = 0, graph.num_nodes
    nodes = torch.cummax(nodes, 0).values
    return [(int(nodes[i]), int(nodes[i + 1]), int(rowptr[nodes[i]]), int(rowptr[nodes[i + 1]])) for i in range(world)]


def edge_features(graph: NeuralGraph, scaled: torch.Tensor, edge_lo: int, edge_hi: int) -> torch.Tensor:
    """Raw edge features ``(edge_hi - edge_lo, F * C)`` of one CSR edge range (``to_edges`` restricted to it)."""
    F, C = graph.max_feat_size, scaled.shape[1]
    lo, hi = edge_lo * F, edge_hi * F
    pos = graph.param_pos
    mine = ((pos >= lo) & (pos < hi)).nonzero().flatten()
    out = torch.zeros(hi - lo, C, dtype=scaled.dtype)
    out[pos[mine] - lo] = scaled[mine]
    out = out.view(edge_hi - edge_lo, F, C)
    const = graph.edge_constants()[edge_lo:edge_hi].to(scaled.dtype)
    is_const = const != 0
    out[is_const, 0, :] = const[is_const].unsqueeze(1)
    return out.view(edge_hi - edge_lo, F * C)


def _check_same_everywhere(states: torch.Tensor, k: int, graph: NeuralGraph, group) -> None:
    """All processes must step the same history with the same k on the same graph."""
    sig = torch.tensor(
        [
            states.double().sum().item(),
            states.double().abs().sum().item(),
            float(k),
            float(graph.num_edges),
            float(graph.num_params),
        ],
        dtype=torch.float64,
    )
    lo, hi = sig.clone(), sig.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise ValueError(
            "nowcast_sharded: the processes were given different states, k or graphs "
            f"(checksums min {lo.tolist()} vs max {hi.tolist()})"
        )


@torch.no_grad()
def nowcast_sharded(
    model,
    graph: NeuralGraph,
    states: torch.Tensor,
    k: int,
    group=None,
    backend: str | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """``model.nowcast`` split over the processes of ``group``; every process gets the full (n_params,) result.

    Call it on every process with the same ``graph``, ``states`` and ``k``. ``stats``, if given, receives the
    bytes this process sent to all-reduces (``allreduce_bytes``) and its shard's size.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "nowcast_sharded: torch.distributed is not initialised (use torchrun / init_process_group first)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model._check_inputs(graph, states, k)
    sent = [0]

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(t, group=group)
        except Exception as exc:  # a dead or hanging peer: gloo/NCCL raise after the group's timeout
            raise RuntimeError(
                f"nowcast_sharded: rank {rank}/{world}: an all-reduce failed ({type(exc).__name__}:"
                f" {exc}); no parameters were changed"
            ) from exc
        sent[0] += t.numel() * t.element_size()
        return t

    try:
        _check_same_everywhere(states, k, graph, group)
    except RuntimeError as exc:
        raise RuntimeError(f"nowcast_sharded: rank {rank}/{world}: peers unreachable ({exc})") from exc
    from .plan import supports

    if not supports(model):  # WNN+ (per-parameter, cheap) or a non-official GNN: every process runs it whole
        return model.nowcast(graph, states, k, backend=backend)
    scaled, scales = scale_params(states.float(), graph.param_shapes, model.scale_method)
    n0, n1, e0, e1 = shard_bounds(graph, world)[rank]

    def combine(rows: torch.Tensor) -> torch.Tensor:
        full = rows.new_zeros(graph.num_nodes, rows.shape[1])
        full[n0:n1] = rows
        return all_reduce(full)

    shard = Shard(n0, n1, e0, e1, combine)
    raw = edge_features(graph, scaled, e0, e1)
    delta = all_reduce(model._delta(graph, scaled, k, backend, True, shard, raw=raw))
    if stats is not None:
        stats.update(allreduce_bytes=sent[0], shard_nodes=n1 - n0, shard_edges=e1 - e0)
    return model._finish(graph, scaled, delta, scales, states.dtype)
