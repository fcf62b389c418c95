"""The NiNo model: loads the official checkpoints and runs the NiNo step on a neural graph.

Module names mirror the official ``NiNoModel`` so its ``state_dict`` loads as is. Inference (``nowcast``) follows
the official semantics, with exact shortcuts: per-node projections instead of per-edge concatenations, no message
pass whose output is unused (the last layer's), and the output head only for horizon k and only on parameter edges.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import plan as folded_plan
from . import stream
from .finish import finish_rows, raise_if_bad
from .graph import GraphLayout, NeuralGraph
from .graph.checks import InputTypeError, check_int, check_not_meta, describe, is_int
from .history import MemoryHistory, TensorHistory, count_nonfinite
from .ops import dispatch
from .scaling import METHODS, row_scales, scale_params

_ACTS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


# ---- model_args checks ------------------------------------------------------------------------------------------
# (expected, type check, value check) per model_args key. The bounds are what the official architecture
# supports with room to spare (its checkpoints use ctx 5, seq_len 40, hid 32-128, 3 layers, lpe 8, 15 edge
# types, 9 feature slots); they exist so that a corrupt or hostile checkpoint fails by name before anything
# is allocated, not after a multi-GB allocation or, worse, by loading and predicting garbage (hid=0).
_Rule = tuple[str, Callable[[object], bool], Callable[[object], bool]]


def _ints(lo: int, hi: int, none: bool = False) -> _Rule:
    return (
        f"an int in {lo}..{hi}" + (" or None" if none else ""),
        lambda v: (none and v is None) or is_int(v),
        lambda v: v is None or lo <= v <= hi,
    )


def _real(lo: float, hi: float, lo_open: bool) -> _Rule:
    return (
        f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]",
        lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
        lambda v: math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi,
    )


def _flag(expected: str = "a bool") -> _Rule:
    return (expected, lambda v: isinstance(v, bool) or (is_int(v) and v in (0, 1)), lambda v: True)


def _choice(options) -> _Rule:
    return (f"one of {list(options)}", lambda v: isinstance(v, str), lambda v: v in options)


_ARG_RULES: dict[str, _Rule] = {
    "ctx": _ints(1, 64),
    "hid": _ints(1, 4096),
    "layers": _ints(1, 64),
    "seq_len": _ints(1, 1000),  # the horizons the head predicts (k in 1..seq_len)
    "lpe": _ints(0, 64),
    "max_feat_size": _ints(0, 1024, none=True),  # 0 / None: 1 slot; 9 for 3x3 convs, 256 for 16x16 patches
    "vocab_size": _ints(1, 1 << 21),
    "edge_types": ("0 or an int in 14..1024", is_int, lambda v: v == 0 or 14 <= v <= 1024),  # types reach 13
    "gnn": (
        "a bool, None or 'none'",
        lambda v: v is None or isinstance(v, (bool, str)) or (is_int(v) and v in (0, 1)),
        lambda v: not isinstance(v, str) or v in ("None", "none"),
    ),
    "dms": _flag(),
    "improved_graph": _flag(),
    "residual": _flag(),
    "wte_pos_enc": _flag(),
    "final_edge_update": _flag(),
    "input_layer": ("a non-empty str ('linear': one layer, else two)", lambda v: isinstance(v, str), bool),
    "act_name": _choice(_ACTS),
    "scale_method": _choice(METHODS),
    "upd_scale": _real(0.0, 1000.0, lo_open=True),
    # official model_args that only steer devices/memory there (no effect here; towers other than 1 would show
    # up as unexpected weight keys)
    "chunk_size": _ints(1, 1 << 40, none=True),
    "message_passing_device": (
        "None, a str or a torch.device",
        lambda v: v is None or isinstance(v, (str, torch.device)),
        lambda v: True,
    ),
    "edge_sample_ratio": _real(0.0, 1.0, lo_open=False),
    "towers": _ints(1, 4096),
}


def check_model_args(args: dict, who: str = "NiNoModel") -> None:
    """Check every ``model_args`` entry by name (unknown keys, types, ranges; ``towers`` must divide ``hid``)
    before a model is built: InputTypeError for a wrong type, ValueError for a value out of range."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise InputTypeError(f"{who}: model_args must be a dict with str keys, got {describe(args)}")
    unknown = sorted(set(args) - set(_ARG_RULES))
    if unknown:
        raise ValueError(f"{who}: unknown model_args {unknown}")
    for key, value in args.items():
        expected, type_ok, value_ok = _ARG_RULES[key]
        if not type_ok(value):
            raise InputTypeError(f"{who}: model_args[{key!r}] must be {expected}, got {describe(value)}")
        if not value_ok(value):
            raise ValueError(f"{who}: model_args[{key!r}] must be {expected}, got {value!r}")
    hid, towers = args.get("hid", 128), args.get("towers", 1)
    if hid % towers:
        raise ValueError(f"{who}: model_args['towers']={towers} must divide model_args['hid']={hid}")


def _check_state(where: str, own: dict, state: dict, args: dict) -> None:
    """The checkpoint's weights against the (meta) model built from ``args``: same keys, same shapes, real
    floating tensors -- so that loading never silently casts integers or copies from a meta tensor."""
    for key, want in own.items():
        if key not in state:
            raise ValueError(f"{where}: not a NiNo checkpoint for model_args={args}: missing key {key!r}")
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"{where}: key {key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)} for model_args={args}"
            )
        check_not_meta(got, where, f"weight {key!r}")
        if not got.is_floating_point():
            raise ValueError(f"{where}: weight {key!r} must be a floating tensor, got {got.dtype}")
    extra = [k for k in state if k not in own]
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]!r} for model_args={args}")


class _MLP(nn.Module):
    """``fc = Sequential(Linear, act, Linear, ...)``, the official MLP's layout (so the keys match)."""

    def __init__(self, in_dim: int, hid: int, out_dim: int | None = None, n_layers: int = 1, act: str = "silu"):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(in_dim if i == 0 else hid, (out_dim or hid) if i == n_layers - 1 else hid))
            if i < n_layers - 1:
                layers.append(_ACTS[act]())
        self.fc = nn.Sequential(*layers)

    def forward(self, x):
        return self.fc(x)


class _Conv(nn.Module):
    """One modulated PNA layer (mean aggregation, one tower)."""

    def __init__(self, hid: int):
        super().__init__()
        self.edge_encoder = nn.Linear(hid, 2 * hid)
        self.pre_nns = nn.ModuleList([nn.Sequential(nn.Linear(2 * hid, hid))])
        self.post_nns = nn.ModuleList([nn.Sequential(nn.Linear(2 * hid, hid))])
        self.lin = nn.Linear(hid, hid)

    def forward(self, x: torch.Tensor, e: torch.Tensor, graph: NeuralGraph, backend=None) -> torch.Tensor:
        pre = self.pre_nns[0][0]
        d = x.shape[1]
        node_dst = F.linear(x, pre.weight[:, :d], pre.bias)  # pre([x_dst, x_src]) split per node
        node_src = F.linear(x, pre.weight[:, d:])
        enc = self.edge_encoder
        agg = dispatch.film_mean(e, graph.rowptr, graph.src, node_dst, node_src, enc.weight, enc.bias, backend=backend)
        return self.lin(self.post_nns[0][0](torch.cat((x, agg), 1)))


class _EdgeMLP(nn.Module):
    def __init__(self, hid: int):
        super().__init__()
        self.lin_e, self.lin_s, self.lin_t, self.lin1 = (nn.Linear(hid, hid) for _ in range(4))

    def forward(self, x: torch.Tensor, e: torch.Tensor, graph: NeuralGraph, backend=None) -> torch.Tensor:
        node_src = F.linear(x, self.lin_s.weight)
        node_dst = F.linear(x, self.lin_t.weight)
        bias = self.lin_e.bias + self.lin_s.bias + self.lin_t.bias
        return dispatch.edge_mlp(
            e,
            graph.src,
            graph.dst,
            self.lin_e.weight,
            bias,
            self.lin1.weight,
            self.lin1.bias,
            node_src=node_src,
            node_dst=node_dst,
            backend=backend,
        )


class _GNN(nn.Module):
    def __init__(self, hid: int, layers: int, final_edge_update: bool):
        super().__init__()
        self.convs = nn.ModuleList([_Conv(hid) for _ in range(layers)])
        self.edge_update = nn.ModuleList([_EdgeMLP(hid) for _ in range(layers if final_edge_update else layers - 1)])


def _embedding(n: int, dim: int, shapes_only: bool) -> nn.Embedding:
    """``nn.Embedding(n, dim)``, left uninitialised when only its shape matters."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim) if shapes_only else None)


class NiNoModel(nn.Module):
    """NiNo (GNN) or WNN+ (per-parameter MLP, ``gnn=False``) with the official hyper-parameters and defaults."""

    def __init__(
        self,
        ctx=5,
        hid=128,
        layers=3,
        gnn=True,
        dms=True,
        max_feat_size=9,
        input_layer="linear",
        act_name="silu",
        residual=True,
        seq_len=40,
        improved_graph=True,
        wte_pos_enc=True,
        vocab_size=50257,
        edge_types=15,
        lpe=8,
        scale_method="std",
        upd_scale=1.0,
        final_edge_update=False,
        **ignored,
    ):
        super().__init__()
        given = {k: v for k, v in locals().items() if k not in ("self", "ignored", "__class__")}
        check_model_args({**given, **ignored}, "NiNoModel")
        if not dms or not improved_graph:
            raise ValueError("NiNoModel: only dms=True and improved_graph=True are supported (as officially)")
        if act_name not in _ACTS or scale_method not in METHODS:
            raise ValueError(f"NiNoModel: act_name must be in {list(_ACTS)} and scale_method in {METHODS}")
        self.ctx, self.hid, self.seq_len, self.max_feat_size = ctx, hid, seq_len, max_feat_size or 1
        self.is_mlp = gnn in (False, None, "None", "none")
        self.residual, self.upd_scale, self.scale_method = residual, upd_scale, scale_method
        self.edge_types, self.act_name = edge_types, act_name
        self.wte_pos_enc = bool(wte_pos_enc) and not self.is_mlp
        self.vocab_size = vocab_size
        self.lpe = 0 if self.is_mlp else lpe
        self.final_edge_update = final_edge_update
        self.train_info: dict | None = None  # set by from_checkpoint for checkpoints trained by nino-fast train
        n_in = 2 if input_layer != "linear" else 1
        # Built under torch.device("meta") by from_checkpoint, only the shapes matter: no initialisation there,
        # since a random init of a meta tensor imports torch._dynamo (1-2 s in a fresh process).
        shapes_only = torch.empty(()).is_meta
        if edge_types > 0:
            self.layer_embed = _embedding(edge_types, hid, shapes_only)
        self.edge_proj = _MLP((1 if self.is_mlp else self.max_feat_size) * ctx, hid, n_layers=n_in, act=act_name)
        if self.is_mlp:
            self.edge_mlp = _MLP(hid, hid, seq_len, n_layers=4, act=act_name)
            return
        if self.wte_pos_enc:
            self.wte_pos_enc_layer = _embedding(vocab_size + 1, hid, shapes_only)  # +1: position 0 means "no token"
        if self.lpe or not self.wte_pos_enc:
            self.node_proj = _MLP(max(1, self.lpe), hid, n_layers=n_in, act=act_name)
        self.gnn = _GNN(hid, layers, final_edge_update)
        self.edge_out = _MLP(hid, hid, self.max_feat_size * seq_len, n_layers=2, act=act_name)
        for m in self.modules() if not shapes_only else ():  # the official initialisation (training from scratch)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    # ---- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path_or_dict, map_location="cpu") -> NiNoModel:
        """Load an official-format checkpoint: ``{'state_dict': ..., 'model_args': {...}}`` or a bare state_dict.
        The checkpoint's ``train_info`` (``nino-fast train``'s record of how it was trained), if any, is kept as
        ``model.train_info`` (else None).

        Every ``model_args`` entry is checked by name (:func:`check_model_args`) and every weight's shape against
        them before any memory is allocated for the model; weights must be real (not meta) floating tensors."""
        where = (
            f"NiNoModel.from_checkpoint({path_or_dict!r})"
            if isinstance(path_or_dict, (str, os.PathLike))
            else "NiNoModel.from_checkpoint"
        )
        if isinstance(path_or_dict, (str, os.PathLike)):
            if os.path.isdir(path_or_dict):
                raise IsADirectoryError(f"{where}: a directory, not a checkpoint file")
            if not os.path.isfile(path_or_dict):
                raise FileNotFoundError(f"{where}: no such file")
            try:
                ckpt = torch.load(path_or_dict, map_location=map_location, weights_only=True)
            except Exception as exc:  # not a torch file, or unsafe pickles
                raise ValueError(f"{where}: not a loadable NiNo checkpoint ({type(exc).__name__}: {exc})") from exc
        else:
            ckpt = path_or_dict
        if not isinstance(ckpt, dict):
            raise ValueError(f"{where}: expected a dict checkpoint, got {type(ckpt).__name__}")
        state = ckpt.get("state_dict", ckpt)
        args = ckpt.get("model_args")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{where}: 'state_dict' must map names to tensors")
        if args is None:  # a bare state_dict: what its keys say (nino_no_posw.pt's weights have no wte_pos_enc)
            args = {} if "wte_pos_enc_layer.weight" in state else {"wte_pos_enc": False}
        check_model_args(args, where)  # before anything is allocated
        with torch.device("meta"):  # shapes only: checked against the weights before any memory is spent
            model = cls(**args)
        _check_state(where, model.state_dict(), state, args)
        # The checkpoint's own tensors become the parameters (fresh float32 CPU copies: a caller's dict is never
        # aliased); to_empty on a meta model would import sympy (~0.6 s in a fresh process).
        own = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}
        model.load_state_dict(own, assign=True)
        info = ckpt.get("train_info")  # how a checkpoint of ours was trained (nino-fast train); None otherwise
        model.train_info = info if isinstance(info, dict) else None
        return model.eval()

    # ---- validation ---------------------------------------------------------------------------------------------
    def _check_inputs(self, graph, states, k, who: str = "NiNoModel.nowcast", named_shapes=None) -> int | None:
        """Every check of a step's inputs, before any work (bad input fails here, by name, not deep in a
        kernel): the model and inputs hold real values, the graph is the model's (``named_shapes``, if given)
        and fits the checkpoint, ``states`` is a finite (n_params, ctx) float tensor, ``k`` an int in
        1..seq_len. Returns ``k`` as a Python int (None stays None)."""
        check_not_meta(next(self.parameters()), who, "the model")
        if not isinstance(graph, NeuralGraph):
            raise InputTypeError(f"{who}: graph must be a NeuralGraph (from build_graph), got {describe(graph)}")
        if named_shapes is not None:
            graph.check_matches(named_shapes, who)
        self._check_states(graph, states, who)
        k = None if k is None else check_int(k, who, "k", 1, self.seq_len)
        self._check_graph(graph, who)
        return k

    def _check_states(self, graph: NeuralGraph, states, who: str) -> None:
        if not isinstance(states, torch.Tensor):
            raise InputTypeError(f"{who}: states must be a (n_params, ctx) tensor, got {describe(states)}")
        check_not_meta(states, who, "states")
        if states.dim() != 2:
            raise ValueError(f"{who}: states must be a (n_params, ctx) tensor, got shape {tuple(states.shape)}")
        if states.shape != (graph.num_params, self.ctx):
            raise ValueError(
                f"{who}: states has shape {tuple(states.shape)}, expected (n_params={graph.num_params}, ctx={self.ctx})"
            )
        if not states.is_floating_point():
            raise InputTypeError(f"{who}: states must be floating point, got {states.dtype}")
        bad = count_nonfinite(states)
        if bad:
            raise ValueError(f"{who}: states contain {bad} NaN/Inf values")

    def _check_graph(self, graph: NeuralGraph, who: str) -> None:
        """The graph's tensors hold values and its features fit the checkpoint (slots, LPE width, vocabulary)."""
        for name in ("rowptr", "src", "dst", "edge_type_u8", "param_pos", "pos_w", "lpe"):
            check_not_meta(getattr(graph, name), who, f"graph.{name}")
        if graph.max_feat_size > self.max_feat_size:
            raise ValueError(
                f"{who}: the graph has {graph.max_feat_size} features per edge (conv kernel size),"
                f" the model supports at most {self.max_feat_size}"
            )
        if self.is_mlp:
            return
        if self.lpe and (graph.lpe is None or graph.lpe.shape != (graph.num_nodes, self.lpe)):
            got = None if graph.lpe is None else tuple(graph.lpe.shape)
            raise ValueError(
                f"{who}: the model needs graph.lpe of shape ({graph.num_nodes}, {self.lpe}), "
                f"got {got}; build the graph with lpe={self.lpe}"
            )
        if self.wte_pos_enc and graph.num_nodes and int(graph.pos_w.max()) > self.vocab_size:
            raise ValueError(
                f"{who}: the graph's word positions reach {int(graph.pos_w.max())}, the model's "
                f"vocab_size is {self.vocab_size}"
            )

    # ---- forward pieces -----------------------------------------------------------------------------------------
    def _edge_input(self, graph: NeuralGraph, raw: torch.Tensor) -> torch.Tensor:
        """Layer-0 edge features: edge_proj(raw history) + type embedding; raw (E, F*ctx)."""
        lin = self.edge_proj.fc[0]
        width = raw.shape[1]
        e = F.linear(raw, lin.weight[:, :width], lin.bias)  # graphs with F < 9 use the first F*ctx inputs
        if len(self.edge_proj.fc) > 1:
            e = self.edge_proj.fc[1:](e)
        if self.edge_types:
            e = e + self.layer_embed(graph.edge_type)
        return e

    def _node_input(self, graph: NeuralGraph) -> torch.Tensor:
        x = torch.zeros(graph.num_nodes, self.hid, device=self.device)
        if self.lpe:
            x = x + self.node_proj(graph.lpe)
        if self.wte_pos_enc:
            x = x + self.wte_pos_enc_layer(graph.pos_w)
        return x

    def _gnn(self, graph, raw, backend=None, for_prediction=True):
        """Run the GNN; returns (x, e). With ``for_prediction`` layers whose node output is unused are skipped."""
        act = _ACTS[self.act_name]()
        x, e = self._node_input(graph), self._edge_input(graph, raw)
        n_layers = len(self.gnn.convs)
        for i, conv in enumerate(self.gnn.convs):
            updates_edges = i < len(self.gnn.edge_update)
            if for_prediction and not updates_edges:
                break  # this layer's node output reaches nothing the prediction uses
            x = conv(x, e, graph, backend)
            if i < n_layers - 1 or updates_edges:
                x = act(x)
            if updates_edges:
                e = self.gnn.edge_update[i](x, e, graph, backend)
        return x, e

    def _head(self, e: torch.Tensor, k: int, n_feat: int) -> torch.Tensor:
        """Horizon-k output of the edge head for the first ``n_feat`` feature slots: (E', n_feat)."""
        fc = self.edge_out.fc
        h = e
        for layer in fc[:-1]:
            h = layer(h)
        last = fc[-1]
        w = last.weight.view(self.max_feat_size, self.seq_len, -1)[:n_feat, k - 1]
        b = last.bias.view(self.max_feat_size, self.seq_len)[:n_feat, k - 1]
        return F.linear(h, w, b)

    # ---- public API ---------------------------------------------------------------------------------------------
    def _folded(self, width: int) -> folded_plan.Folded:
        """Folded weights for raw edge features of ``width`` columns (cached; rebuilt if parameters change)."""
        version = (self.device, *(p._version for p in self.parameters()))  # moving the model refolds
        cache = self.__dict__.setdefault("_fold_cache", {})
        if cache.get("version") != version:
            cache.clear()
            cache["version"] = version
        if width not in cache:
            cache[width] = folded_plan.fold(self, width)
        return cache[width]

    @torch.no_grad()
    def nowcast(
        self,
        graph: NeuralGraph,
        states: torch.Tensor,
        k: int,
        backend: str | None = None,
        fused: bool = True,
        max_memory: int | str | None = None,
        progress: bool | None = None,
        edge_sample_ratio: float = 0.0,
        subgraph: bool = False,
        edge_dtype: torch.dtype = torch.float32,
        named_shapes: list[tuple[str, tuple[int, ...]]] | None = None,
    ) -> torch.Tensor:
        """The NiNo step: raw history (n_params, ctx), oldest first -> predicted parameters (n_params,) at k.

        Steps: per-tensor scaling of the history, edge features, GNN (or WNN+ MLP), horizon-k head, residual on
        the last state, unscaling. ``states`` is not modified. Raises ValueError for bad inputs and for a
        non-finite prediction. ``fused=True`` runs the folded plan when the architecture allows it, streamed over
        destination-row tiles (:mod:`nino_fast.stream`): ``max_memory`` (bytes, or a string such as ``"6GB"`` /
        ``"6GiB"``; default: half the available memory, at most 2 GiB on the CPU) bounds what the step allocates
        beyond its inputs and output, exactly (any tiling gives the same result). ``progress``: a tqdm bar over
        layers and tiles (None: only for steps of more than a few seconds, on a terminal). ``fused=False`` runs
        the layer-by-layer path of the official model (same maths, more work, E x D memory; WNN+ needs no tiles).

        The official memory-saving approximations, off by default (results differ from the exact step):
        ``edge_sample_ratio`` in (0, 1): each message pass aggregates over a random part of the edges;
        ``subgraph=True``: one neural graph per transformer block (see :func:`nino_fast.stream.nowcast_subgraphs`).

        ``edge_dtype=torch.bfloat16`` (GPU backends ``cuda`` / ``triton`` only): the per-edge features the kernels
        read (raw history, the head's edge states) are bfloat16; weights, node terms and accumulation stay float32.
        About 2x faster GEMMs on tensor cores, at bfloat16 accuracy (not the exact step).

        ``named_shapes``: the model's ``(name, shape)`` list; if given, a graph built for another model (even one
        with as many parameters) is refused (:meth:`NeuralGraph.check_matches`). ``k``: an int (NumPy integers
        too) in 1..seq_len. The model, ``states`` and the graph must not be on the meta device.

        Models too large to hold their graph's edge arrays or their float32 history: ``graph`` may be a
        :class:`~nino_fast.graph.pieces.GraphLayout` (``build_graph_layout(model)``: each tile's edges assembled
        when a pass reaches it) and ``states`` a :class:`~nino_fast.history.TensorHistory` (read one parameter
        tensor at a time, e.g. from checkpoint files) or a (n_params, ctx) tensor of any float dtype (bf16
        snapshots: never converted whole). The result is bitwise that of the built graph and the float32 history,
        in the history's dtype (:func:`nino_fast.stream.nowcast_layout`; exact step only).
        """
        if isinstance(graph, GraphLayout):
            opts = dict(fused=fused, ratio=edge_sample_ratio, subgraph=subgraph, edge_dtype=edge_dtype)
            return self._nowcast_layout(graph, states, k, backend, max_memory, progress, named_shapes, **opts)
        k = self._check_inputs(graph, states, k, "NiNoModel.nowcast", named_shapes)
        states = states.contiguous()  # torch orders a reduction's sums by the layout: same values, same bits
        path = self._path(backend, fused, max_memory, edge_sample_ratio, subgraph, edge_dtype)
        graph = graph.to(self.device)
        if path == "in-memory":
            scaled, scales = scale_params(
                states.to(device=self.device, dtype=torch.float32), graph.param_shapes, self.scale_method
            )
            delta = self._delta(graph, scaled, k, backend, fused)
            return self._finish(graph, scaled, delta, scales, states.dtype).to(states.device)
        opts = dict(
            backend=backend, max_memory=max_memory, progress=progress, edge_sample_ratio=float(edge_sample_ratio)
        )
        if edge_dtype != torch.float32:
            opts["edge_dtype"] = edge_dtype
        step = stream.nowcast_subgraphs if path == "subgraphs" else stream.nowcast_streamed
        return step(self, graph, states, k, **opts)

    def _nowcast_layout(
        self, layout, states, k, backend, max_memory, progress, named_shapes, fused, ratio, subgraph, edge_dtype
    ) -> torch.Tensor:
        """:meth:`nowcast` on a :class:`~nino_fast.graph.pieces.GraphLayout` (see there)."""
        who = "NiNoModel.nowcast"
        exact = fused and not subgraph and edge_dtype == torch.float32 and not (0.0 < ratio < 1.0)
        if not exact:
            raise ValueError(
                f"{who}: a GraphLayout runs the exact folded step only (fused=True, no edge_sample_ratio, "
                "subgraph or edge_dtype); build the graph with build_graph for the others"
            )
        if named_shapes is not None:
            layout.nodes.check_matches(named_shapes, who)
        history = states
        if isinstance(states, torch.Tensor):
            self._check_layout_states(layout, states, who)
            history = MemoryHistory(states.contiguous(), layout.param_shapes)  # (as nowcast: same bits)
        elif not isinstance(states, TensorHistory):
            raise InputTypeError(
                f"{who}: states must be a (n_params, ctx) tensor or a TensorHistory, got {describe(states)}"
            )
        result = stream.nowcast_layout(
            self, layout, history, k, backend=backend, max_memory=max_memory, progress=progress, where=who
        )
        return result.to(states.device) if isinstance(states, torch.Tensor) else result

    def _check_layout_states(self, layout, states: torch.Tensor, who: str) -> None:
        check_not_meta(states, who, "states")
        if states.shape != (layout.num_params, self.ctx):
            raise ValueError(
                f"{who}: states has shape {tuple(states.shape)}, "
                f"expected (n_params={layout.num_params}, ctx={self.ctx})"
            )
        if not states.is_floating_point():
            raise InputTypeError(f"{who}: states must be floating point, got {states.dtype}")

    def _path(self, backend, fused: bool, max_memory, ratio, subgraph: bool, edge_dtype) -> str:
        """Which step :meth:`nowcast` runs: ``"streamed"`` (the folded plan over row tiles), ``"subgraphs"`` (the
        same per transformer block) or ``"in-memory"`` (the layer-by-layer path, WNN+); ValueError for options that
        step cannot honour."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"NiNoModel.nowcast: edge_sample_ratio must be a number in [0, 1], got {ratio!r}")
        folded = fused and not self.is_mlp and folded_plan.supports(self)
        if edge_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"NiNoModel.nowcast: edge_dtype must be float32, bfloat16 or float16, got {edge_dtype}")
        if edge_dtype != torch.float32:
            chosen = dispatch.resolve(self.device, backend)
            if chosen not in ("cuda", "triton") or not folded:
                raise ValueError(
                    f"NiNoModel.nowcast: edge_dtype={edge_dtype} needs the folded plan (fused=True, official"
                    f" architecture) on a GPU backend (cuda or triton); this call would use backend {chosen!r}"
                    f"{'' if folded else ' without the folded plan'}"
                )
        if folded:
            return "subgraphs" if subgraph else "streamed"
        if (max_memory is not None or subgraph or 0.0 < ratio < 1.0) and not self.is_mlp:
            raise ValueError(
                "NiNoModel.nowcast: max_memory, edge_sample_ratio and subgraph need the folded plan (fused=True and"
                " the official architecture)"
            )
        return "in-memory"

    @property
    def device(self) -> torch.device:
        """Where the model's weights live: ``nowcast`` runs there (graph and states are moved; the result comes
        back to the states' device)."""
        return next(self.parameters()).device

    def _delta(
        self,
        graph: NeuralGraph,
        scaled: torch.Tensor,
        k: int,
        backend=None,
        fused=True,
        raw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(P,) scaled predicted change per parameter (in memory: the whole graph at once)."""
        if self.is_mlp:
            return self._wnn(graph, scaled, k)
        F_ = graph.max_feat_size
        pos = graph.param_pos
        raw = graph.to_edges(scaled) if raw is None else raw
        edge_of_param = torch.div(pos, F_, rounding_mode="floor")
        used = torch.unique(edge_of_param)  # only edges that carry parameters need the head
        if fused and folded_plan.supports(self):
            pred = folded_plan.predict_deltas(self, graph, raw, k, used, self._folded(raw.shape[1]), backend)
        else:
            _, e = self._gnn(graph, raw, backend)
            pred = self._head(e[used], k, F_)
        return pred[torch.searchsorted(used, edge_of_param), pos % F_]

    def _finish(self, graph, scaled, delta, scales, dtype) -> torch.Tensor:
        """Residual on the last state, finiteness check, unscaling (:func:`nino_fast.finish.finish_rows`)."""
        shift, scale = row_scales(scales, graph.param_shapes, self.scale_method)
        last = scaled[:, -1] if self.residual else None
        out, bad = finish_rows(delta, shift, scale, last, self.upd_scale)
        raise_if_bad(bad, "NiNoModel.nowcast")
        return out.to(dtype)

    def _wnn(self, graph: NeuralGraph, scaled: torch.Tensor, k: int) -> torch.Tensor:
        """WNN+: an MLP per parameter on its own history and its edge type."""
        types = graph.edge_type[torch.div(graph.param_pos, graph.max_feat_size, rounding_mode="floor")]
        h = self.edge_proj(scaled)
        if self.edge_types:
            h = h + self.layer_embed(types)
        fc = self.edge_mlp.fc
        for layer in fc[:-1]:
            h = layer(h)
        return F.linear(h, fc[-1].weight[k - 1 : k], fc[-1].bias[k - 1 : k]).squeeze(1)

    @torch.no_grad()
    def embed(
        self,
        graph: NeuralGraph,
        states: torch.Tensor,
        pooled: bool = False,
        backend: str | None = None,
        named_shapes: list[tuple[str, tuple[int, ...]]] | None = None,
    ):
        """Node (N, hid) and edge (E, hid) embeddings after the GNN, edges in CSR order.

        ``pooled=True`` returns their means over nodes / edges, i.e. the official ``return_embeddings`` output.
        Inputs are checked as for :meth:`nowcast` (``named_shapes`` too).
        """
        if self.is_mlp:
            raise ValueError("NiNoModel.embed: WNN+ checkpoints (gnn=False) have no graph embeddings")
        self._check_inputs(graph, states, None, "NiNoModel.embed", named_shapes)
        graph = graph.to(self.device)
        scaled, _ = scale_params(
            states.to(device=self.device, dtype=torch.float32), graph.param_shapes, self.scale_method
        )
        x, e = self._gnn(graph, graph.to_edges(scaled), backend, for_prediction=False)
        return (x.mean(0), e.mean(0)) if pooled else (x, e)
