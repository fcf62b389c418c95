"""Inputs of a metanetwork: a model -> its neural graph with permutation-equivariant node and edge features, and a
batch of such graphs as one block-diagonal CSR graph.

Node features depend on the graph's structure only, never on a node's id: the histogram of the edge types into
and out of the node (this tells inputs, hidden neurons, outputs, bias and norm nodes apart), its in/out degree
and its depth (longest path from an input, relative to the graph's). Every hidden neuron of one layer gets the
same features, so permuting hidden neurons permutes nodes and edges and nothing else. NiNo's Laplacian
eigenvectors are deliberately not used: their signs and order are not invariant. (This holds where consecutive
weighted layers connect unit to unit, e.g. ConvNets with global pooling before the classifier. A ``Flatten`` of
several spatial positions into a ``Linear`` is laid out as ``build_graph`` lays it out for NiNo -- the channels are
the first rows of the linear layer's inputs --, on which a channel permutation is not a graph relabelling.)

Edge features: the parameter values on the edge (``NeuralGraph.to_edges``: one slot per element of a 3x3
kernel, zero-padded to ``max_feat_size`` slots; constants on structural edges), plus the running mean and std
of a BatchNorm channel on the edge of its ``weight`` (the buffers are part of the function the model computes).
The edge type is passed separately (an embedding in the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..graph import NeuralGraph, build_graph, detect_arch, values_per_edge
from ..graph.layout import SELF_LOOP
from ..nn import CSRGraph

NUM_EDGE_TYPES = 16  # the official types reach 13 (self-loop)
NODE_DIM = 2 * NUM_EDGE_TYPES + 5
BN_STATS = 2  # running mean, running std
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_MAX_DEPTH_ITERS = 256
_WEIGHT_TYPES = [1, 3, 5, 6, 7, 8, 9]  # fc, conv, embeddings, q/k/v
NODE_GROUPS = 4  # inputs, bias/norm nodes, hidden, outputs
EDGE_GROUPS = 12  # (weight, bias, norm, structural) x (first layer, in between, outputs)


@dataclass
class GraphInput:
    """One model as metanetwork input: CSR ``rowptr`` (N+1,) int64, ``src``/``dst`` (E,) int64 (destination-sorted),
    ``edge_type`` (E,) int64, ``x`` (N, NODE_DIM) and ``edge_attr`` (E, max_feat_size + 2) float32,
    ``node_group`` (N,) / ``edge_group`` (E,) int64 readout groups (:func:`structure`)."""

    rowptr: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_type: torch.Tensor
    x: torch.Tensor
    edge_attr: torch.Tensor
    node_group: torch.Tensor
    edge_group: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def num_edges(self) -> int:
        return self.src.numel()


@dataclass
class GraphBatch:
    """Many graphs as one block-diagonal graph: the fields of :class:`GraphInput` concatenated (node ids offset),
    ``csr`` the :class:`~nino_fast.nn.CSRGraph` the layers take, ``edge_index`` (2, E) in CSR order (for PyG
    layers), ``node_batch`` (N,) / ``edge_batch`` (E,) the graph of each node / edge, ``node_group`` /
    ``edge_group`` their readout groups."""

    x: torch.Tensor
    edge_attr: torch.Tensor
    edge_type: torch.Tensor
    csr: CSRGraph
    edge_index: torch.Tensor
    node_batch: torch.Tensor
    edge_batch: torch.Tensor
    node_group: torch.Tensor
    edge_group: torch.Tensor
    num_graphs: int

    def to(self, device: torch.device | str) -> GraphBatch:
        """This batch with its tensors on ``device``."""
        move = lambda t: t.to(device)
        csr = CSRGraph(
            *(move(getattr(self.csr, f)) for f in ("rowptr", "src", "dst", "perm", "inv_perm")), self.csr.in_order
        )
        fields = {k: move(v) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return GraphBatch(**fields, csr=csr, num_graphs=self.num_graphs)


def split_state(state: dict) -> tuple[list[tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A state dict -> (parameters as ``(name, tensor)`` in order, BatchNorm buffers by name). Buffers are
    recognised by their names (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"a model's state dict must be a non-empty dict, got {type(state).__name__} {state!r:.80}")
    params, buffers = [], {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} must be a tensor, got {type(value).__name__}")
        if name.endswith(_BUFFER_SUFFIXES):
            buffers[name] = value
        else:
            params.append((name, value))
    return params, buffers


def params_of(model: nn.Module | dict) -> tuple[list[tuple[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(parameters in ``named_parameters()`` order, BatchNorm buffers) of a module or a state dict."""
    if isinstance(model, nn.Module):
        params = [(n, p.detach()) for n, p in model.named_parameters()]
        buffers = {n: b for n, b in model.named_buffers() if n.endswith(_BUFFER_SUFFIXES)}
        if not params:
            raise ValueError(f"the model {type(model).__name__} has no parameters")
        return params, buffers
    if isinstance(model, dict):
        return split_state(model)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model).__name__}")


SUPPORTED_LAYERS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
)  # fmt: skip


def check_supported(model: nn.Module | dict) -> None:
    """ValueError unless a generic (non-transformer) model is made of layers the neural graph describes: fc and
    conv layers and their norms. (``build_graph`` lays out any 1-4-D tensors, so an LSTM or a bare attention
    module would get a graph that does not follow its computation.) A state dict is checked by its names only:
    every parameter must be a ``weight`` or a ``bias``."""
    if isinstance(model, nn.Module):
        bad = [
            f"{name or '(root)'} ({type(m).__name__})"
            for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, SUPPORTED_LAYERS)
        ]
        if bad:
            kinds = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise ValueError(
                f"metanet: unsupported architecture: layers {bad[:4]} are not neural-graph layers (supported: {kinds}, "
                "and the transformers build_graph detects)"
            )
    elif isinstance(model, dict):
        bad = [n for n, v in model.items() if not n.endswith(("weight", "bias") + _BUFFER_SUFFIXES)]
        if bad:
            raise ValueError(
                f"metanet: unsupported state dict entries {bad[:4]}: a generic model's parameters are named "
                "'<layer>.weight' / '<layer>.bias'"
            )


def node_features(graph: NeuralGraph) -> torch.Tensor:
    """(N, NODE_DIM) float32: in- and out-edge type fractions, log in/out degree, input/output flags, relative
    depth. Self-loops are left out (every node has one)."""
    return structure(graph)[0]


def structure(graph: NeuralGraph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(node features (N, NODE_DIM), node groups (N,), edge groups (E,)) of a neural graph, from its structure
    alone (invariant to hidden-neuron permutations).

    Node groups (:data:`NODE_GROUPS`): input neurons (no in-edge, weight out-edges), parameter nodes (the bias and
    norm nodes: no in-edge otherwise), hidden neurons, output neurons (no out-edge). Edge groups
    (:data:`EDGE_GROUPS`): kind (weight, bias, norm, structural) x place (into the first layer's neurons, into
    the outputs, in between): the readout pools each group apart, as StatNN's per-layer statistics do.
    """
    n = graph.num_nodes
    etype_all, src_all, dst_all = graph.edge_type_u8.long(), graph.src.long(), graph.dst.long()
    keep = etype_all != SELF_LOOP
    etype, src, dst = etype_all[keep], src_all[keep], dst_all[keep]
    ones = torch.ones(etype.numel())
    hist_in = torch.zeros(n, NUM_EDGE_TYPES).index_put_((dst, etype), ones, accumulate=True)
    hist_out = torch.zeros(n, NUM_EDGE_TYPES).index_put_((src, etype), ones, accumulate=True)
    deg_in, deg_out = hist_in.sum(1), hist_out.sum(1)
    depth = _depth(n, src, dst)
    x = torch.cat(
        (
            hist_in / deg_in.clamp(min=1).unsqueeze(1),
            hist_out / deg_out.clamp(min=1).unsqueeze(1),
            torch.log1p(deg_in).unsqueeze(1) / 4,
            torch.log1p(deg_out).unsqueeze(1) / 4,
            (deg_in == 0).float().unsqueeze(1),
            (deg_out == 0).float().unsqueeze(1),
            (depth / depth.max().clamp(min=1)).unsqueeze(1),
        ),
        1,
    )
    weight_out = hist_out[:, _WEIGHT_TYPES].sum(1) > 0
    node_group = torch.full((n,), 2, dtype=torch.int64)  # hidden
    node_group[(deg_in == 0) & ~weight_out] = 1  # bias / norm nodes
    node_group[(deg_in == 0) & weight_out] = 0  # inputs
    node_group[(deg_out == 0) & (deg_in > 0)] = 3  # outputs
    kind = torch.full_like(etype_all, 3)  # structural (self-loops, residual, head)
    kind[torch.isin(etype_all, torch.tensor(_WEIGHT_TYPES))] = 0
    kind[etype_all == 2] = 1  # bias
    kind[etype_all == 4] = 2  # norm
    place = torch.ones_like(etype_all)  # in between
    place[depth[dst_all] == 1] = 0  # into the first layer's neurons
    place[node_group[dst_all] == 3] = 2  # into the outputs
    return x, node_group, kind * 3 + place


def _depth(n: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(N,) float32 longest-path depth from the sources (nodes without in-edges), by relaxation over all edges at
    once; a graph with cycles stops after a fixed number of rounds (still a function of the structure only)."""
    depth = torch.zeros(n)
    for _ in range(_MAX_DEPTH_ITERS):
        new = depth.scatter_reduce(0, dst, depth[src] + 1, reduce="amax", include_self=True)
        if torch.equal(new, depth):
            break
        depth = new
    return depth


def edge_features(graph: NeuralGraph, params, buffers: dict, max_feat_size: int) -> torch.Tensor:
    """(E, max_feat_size + 2) float32 edge features, CSR order: parameter values per slot, BatchNorm running
    mean / std on the edges of the BatchNorm weight."""
    if graph.max_feat_size > max_feat_size:
        name, shape = next(
            ((n, tuple(p.shape)) for n, p in params if values_per_edge(p.shape) > max_feat_size),
            ("?", ()),
        )
        raise ValueError(
            f"metanet: {name!r} of shape {shape} has {graph.max_feat_size} elements per edge (a kernel larger than "
            f"3x3); this metanetwork takes at most max_feat_size={max_feat_size}"
        )
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for _, p in params])
    slots = graph.to_edges(flat)  # (E, F)
    out = torch.zeros(graph.num_edges, max_feat_size + BN_STATS)
    out[:, : slots.shape[1]] = slots
    offset = 0
    for name, p in params:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        mean, var = (
            (buffers.get(f"{prefix}.running_mean"), buffers.get(f"{prefix}.running_var")) if prefix else (None,) * 2
        )
        if p.dim() == 1 and mean is not None and var is not None:
            if mean.shape != p.shape or var.shape != p.shape:
                raise ValueError(
                    f"metanet: BatchNorm buffers of {prefix!r} have shapes {tuple(mean.shape)} / {tuple(var.shape)}, "
                    f"its weight {tuple(p.shape)}"
                )
            edges = torch.div(graph.param_pos[offset : offset + p.numel()], graph.max_feat_size, rounding_mode="floor")
            out[edges, max_feat_size] = mean.float().cpu()
            out[edges, max_feat_size + 1] = var.float().cpu().clamp(min=0).sqrt()
        offset += p.numel()
    return out


class GraphCache:
    """Structure (CSR, edge types, node features) per distinct architecture, built once: zoo models of one
    architecture share it and only their edge features are computed per model."""

    def __init__(self):
        self._graphs: dict[tuple, tuple] = {}

    def graph(self, named_shapes: list[tuple[str, tuple[int, ...]]]) -> tuple:
        """(graph, node features, node groups, edge groups) of the architecture ``named_shapes``."""
        key = tuple(named_shapes)
        if key not in self._graphs:
            graph = build_graph(named_shapes, lpe=0)
            self._graphs[key] = (graph, *structure(graph))
        return self._graphs[key]


def graph_input(model: nn.Module | dict, max_feat_size: int, cache: GraphCache | None = None) -> GraphInput:
    """The :class:`GraphInput` of a module or a state dict (architectures ``build_graph`` supports; ValueError
    naming the problem otherwise)."""
    if isinstance(model, nn.Module) and detect_arch(model)[0] != "generic":
        return module_graph_input(model, max_feat_size)
    check_supported(model)
    params, buffers = params_of(model)
    bad = [f"{n}: {v.dtype}" for n, v in params if not v.is_floating_point()]
    if bad:
        raise TypeError(f"metanet: parameters must be floating tensors, got {bad[:3]}")
    graph, *struct = (cache or GraphCache()).graph([(n, tuple(v.shape)) for n, v in params])
    return _input(graph, struct, edge_features(graph, params, buffers, max_feat_size))


def _input(graph: NeuralGraph, struct, edge_attr: torch.Tensor) -> GraphInput:
    x, node_group, edge_group = struct
    return GraphInput(
        graph.rowptr, graph.src.long(), graph.dst.long(), graph.edge_type_u8.long(), x, edge_attr, node_group,
        edge_group,
    )  # fmt: skip


def module_graph_input(model: nn.Module, max_feat_size: int) -> GraphInput:
    """:func:`graph_input` of a module whose architecture ``build_graph`` detects (e.g. a Hugging Face
    transformer): the graph is built from the module itself, so its head counts come from its config. A state
    dict alone is read as a generic (fc/conv) model."""
    params, buffers = params_of(model)
    graph = build_graph(model, lpe=0)
    return _input(graph, structure(graph), edge_features(graph, params, buffers, max_feat_size))


def collate(items: list[GraphInput]) -> GraphBatch:
    """Block-diagonal batch: node ids of graph b are offset by the nodes of the graphs before it; the CSR stays
    destination-sorted, so no sort is needed (``perm`` is the identity, ``in_order``: the layers read the edge
    features in place)."""
    if not items:
        raise ValueError("collate: no graphs to batch")
    n_nodes = torch.tensor([g.num_nodes for g in items])
    n_edges = torch.tensor([g.num_edges for g in items])
    node_off = torch.cumsum(n_nodes, 0) - n_nodes
    edge_off = torch.cumsum(n_edges, 0) - n_edges
    node_off_e = torch.repeat_interleave(node_off, n_edges)
    src = torch.cat([g.src for g in items]) + node_off_e
    dst = torch.cat([g.dst for g in items]) + node_off_e
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64)] + [g.rowptr[1:] for g in items])
    rowptr[1:] += torch.repeat_interleave(edge_off, n_nodes)
    ident = torch.arange(src.numel())
    csr = CSRGraph(
        rowptr=rowptr, src=src.to(torch.int32), dst=dst.to(torch.int32), perm=ident, inv_perm=ident, in_order=True
    )
    graphs = torch.arange(len(items))
    return GraphBatch(
        x=torch.cat([g.x for g in items]),
        edge_attr=torch.cat([g.edge_attr for g in items]),
        edge_type=torch.cat([g.edge_type for g in items]),
        csr=csr,
        edge_index=torch.stack((src, dst)),
        node_batch=torch.repeat_interleave(graphs, n_nodes),
        edge_batch=torch.repeat_interleave(graphs, n_edges),
        node_group=torch.cat([g.node_group for g in items]),
        edge_group=torch.cat([g.edge_group for g in items]),
        num_graphs=len(items),
    )
