"""``build_graph``: a model (or its ``(name, shape)`` list) -> the official NiNo neural graph, as CSR."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch

from .checks import InputTypeError, check_named_shapes, check_not_meta, describe, is_int
from .entries import ARCHS, NAMES, TRANSFORMERS, expand
from .heads import check_heads
from .layout import Layout
from .lpe import block_lpe
from .neural_graph import NeuralGraph, assemble, assemble_rows, csr_rowptr, row_ranges
from .pieces import GraphLayout, RowRange

NamedShapes = Iterable[tuple[str, "torch.Size | tuple[int, ...] | torch.Tensor"]]

logger = logging.getLogger(__name__)


def detect_arch(module: torch.nn.Module) -> tuple[str, int | None, int | None]:
    """(arch, num_heads, num_key_value_heads) of a known transformer module; ('generic', None, None)
    otherwise. The counts are reported as the config has them; :func:`build_graph` checks them (positive ints
    dividing the widths they split). Reads only configs and shapes, so a module on the meta device is fine."""
    cls_module = type(module).__module__
    if cls_module.startswith("transformers"):
        import transformers as tf

        cfg = module.config
        if isinstance(module, tf.GPT2PreTrainedModel):
            return "gpt2", cfg.n_head, None
        if isinstance(module, tf.BertPreTrainedModel):
            return "bert", cfg.num_attention_heads, None
        if isinstance(module, tf.LlamaPreTrainedModel):
            return "llama", cfg.num_attention_heads, cfg.num_key_value_heads
        if hasattr(tf, "Qwen3PreTrainedModel") and isinstance(module, tf.Qwen3PreTrainedModel):
            return "qwen3", cfg.num_attention_heads, cfg.num_key_value_heads
        if _llama_like(module):  # Mistral, Qwen2, Gemma, ...: Llama's parameters, heads and names
            return "llama", *config_heads(module)
    if cls_module.startswith("torchvision"):
        from torchvision.models import VisionTransformer

        if isinstance(module, VisionTransformer):
            return "vit", module.encoder.layers[0].num_heads, None
    names = [n for n, _ in module.named_parameters()]
    if any(n.endswith("attn.qkv_w") for n in names) and any("value_embeds" in n for n in names):
        heads = next((m.num_heads for m in module.modules() if hasattr(m, "num_heads")), None)
        return "nanogpt", heads, None
    return "generic", None, None


def config_heads(module: torch.nn.Module) -> tuple[int | None, int | None]:
    """(num_heads, num_key_value_heads) as a Hugging Face style ``module.config`` has them, else None each."""
    cfg = getattr(module, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv = getattr(cfg, "num_key_value_heads", None)
    return (heads if isinstance(heads, int) else None), (kv if isinstance(kv, int) else None)


_LLAMA_PARTS = ("embed_tokens.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight")  # fmt: skip


def _llama_like(module: torch.nn.Module) -> bool:
    """A transformers decoder with Llama's parameter names (separate q/k/v projections, a gated MLP) and head
    counts in its config."""
    names = [n for n, _ in module.named_parameters()]
    has = all(any(n.endswith(part) for n in names) for part in _LLAMA_PARTS)
    return has and config_heads(module)[0] is not None


def _validate(named: list[tuple[str, tuple[int, ...]]], arch: str) -> None:
    """Shapes and names the layout can place (types and duplicates are checked by ``check_named_shapes``)."""
    where = f"build_graph(arch={arch!r})"
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"{where}: unknown arch; expected one of {list(ARCHS)}")
    if not named:
        raise ValueError(f"{where}: the model has no parameters")
    bad = [f"{n} {list(s)}" for n, s in named if len(s) == 0 or len(s) > 4 or math.prod(s) == 0]
    if bad:
        raise ValueError(
            f"{where}: unsupported parameter shapes (neural graphs take 1-D to 4-D, non-empty "
            f"tensors, e.g. no scalars or 3-D convs): {bad}"
        )
    if arch not in TRANSFORMERS:
        return
    nm = NAMES[arch]
    if not any(n.endswith(nm.get("attn", nm["attn_q"])) for n, _ in named):
        raise ValueError(
            f"{where}: no attention parameters found (expected names ending with "
            f"{nm.get('attn', nm['attn_q'])!r}); parameter names: {[n for n, _ in named[:8]]}..."
        )


def _arch_and_heads(model, arch, num_heads, num_key_value_heads) -> tuple[str, int | None, int | None, dict]:
    """The architecture and head counts to build with: the arguments, completed from the module's config when
    ``arch`` is not given (explicit counts win); ``origin`` says where each count came from."""
    origin = {"num_heads": "passed", "num_key_value_heads": "passed"}
    if isinstance(model, torch.nn.Module) and (arch is None or arch in TRANSFORMERS):
        # a given transformer arch takes its head counts from the config (e.g. a Llama-like model as "llama")
        arch, heads, kv = detect_arch(model) if arch is None else (arch, *config_heads(model))
        for name, given, found in (("num_heads", num_heads, heads), ("num_key_value_heads", num_key_value_heads, kv)):
            if given is not None and found is not None and given != found:
                logger.warning(
                    "build_graph: %s=%s given, the model's config has %s; the graph uses %s", name, given, found, given
                )
        if num_heads is None:
            num_heads, origin["num_heads"] = heads, "detected from the model config"
        if num_key_value_heads is None:
            num_key_value_heads, origin["num_key_value_heads"] = kv, "detected from the model config"
    return arch or "generic", num_heads, num_key_value_heads, origin


def build_layout(
    model, arch: str | None = None, num_heads: int | None = None, num_key_value_heads: int | None = None
) -> tuple[list, list, Layout]:
    """``(named shapes, entries, layout)`` of ``model`` (arguments as for :func:`build_graph`): the graph's
    block descriptors (``layout.blocks``) without any per-edge array, e.g. for :func:`~.lpe.block_lpe`
    alone. All input checks happen here, before any layout work."""
    arch, num_heads, num_key_value_heads, origin = _arch_and_heads(model, arch, num_heads, num_key_value_heads)
    named = check_named_shapes(model, f"build_graph(arch={arch!r})")
    _validate(named, arch)
    heads, kv = check_heads(named, arch, num_heads, num_key_value_heads, origin)
    entries = expand(named, arch, heads, kv)
    return named, entries, Layout(entries, arch, heads, kv).run()


def build_graph(
    model: torch.nn.Module | NamedShapes,
    arch: str | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    lpe: int | torch.Tensor | np.ndarray | None = 8,
    lpe_cache: bool | None = None,
) -> NeuralGraph:
    """Build the official NiNo neural graph of ``model``.

    Args:
        model: an ``nn.Module`` (its ``named_parameters()``), or ``(name, shape)`` pairs in that order.
        arch: one of ``generic, gpt2, llama, qwen3, bert, vit, nanogpt``; detected for Hugging Face /
            torchvision / NanoGPT modules, ``generic`` (fc/conv layers) for anything else.
        num_heads, num_key_value_heads: attention heads (detected from module configs; required for
            transformers given as names); key/value heads default to ``num_heads`` (no grouped-query
            attention).
        lpe: number of Laplacian eigenvectors to compute, a precomputed ``(num_nodes, k)`` tensor, or
            0/None. Computed matrix-free from the block layout (:func:`~.lpe.block_lpe`).
        lpe_cache: use the on-disk LPE cache for large graphs (None: on unless ``NINO_FAST_LPE_CACHE=0``).

    Returns:
        NeuralGraph in destination-sorted CSR form (see :class:`NeuralGraph`), with the
        :func:`~.checks.fingerprint` of ``model``'s ``(name, shape)`` list (``graph.fingerprint``).

    Raises:
        ValueError / TypeError: bad names or shapes (dimensions must be positive ints, names unique non-empty
        strings), head counts that are not positive ints or do not divide the widths they split, a bad ``lpe``.
        A model on the meta device is fine: only its shapes are read.
    """
    named, entries, layout = build_layout(model, arch, num_heads, num_key_value_heads)
    arch = layout.arch
    graph = assemble(entries, layout, named, arch, pos_w_enabled=arch != "generic")
    graph.meta.update(num_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads)
    graph.lpe = _lpe(layout.blocks, graph.num_nodes, lpe, lpe_cache)
    return graph


def build_graph_part(
    model: torch.nn.Module | NamedShapes,
    part: int,
    parts: int,
    arch: str | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    lpe: int | torch.Tensor | np.ndarray | None = 8,
    lpe_cache: bool | None = None,
) -> tuple[NeuralGraph, torch.Tensor, RowRange]:
    """Part ``part`` of ``parts`` of :func:`build_graph`'s graph, built without the rest: ``(graph, ids, rows)``,
    ``rows`` its :class:`~.pieces.RowRange`. The parts are :func:`row_ranges` (contiguous destination rows with
    ~E / parts edges each, as :func:`nino_fast.distributed.shard_bounds`). ``graph`` has all N nodes (node
    inputs: ``rowptr`` (N+1,), ``pos_w``, ``lpe``) but only the part's edges, numbered from 0 (other rows are
    empty; ``graph.meta["whole_num_edges"]``: E); ``graph.param_pos`` holds the slots of the parameters ``ids``
    (sorted; int32 where the values fit) on them. Memory: the part's edge arrays and O(N) per-node arrays; the LPE
    is computed matrix-free from the layout (or read from its cache) as for the whole graph."""
    if not (is_int(parts) and parts >= 1 and is_int(part) and 0 <= part < parts):
        raise ValueError(f"build_graph_part: part must be in 0..parts-1 with parts >= 1, got {part} of {parts}")
    whole = build_graph_layout(model, arch, num_heads, num_key_value_heads, lpe, lpe_cache)
    bounds = row_ranges(whole.rowptr, parts)[part]
    graph, ids = whole.piece(bounds.node_lo, bounds.node_hi)
    return graph, ids, bounds


def build_graph_layout(
    model: torch.nn.Module | NamedShapes,
    arch: str | None = None,
    num_heads: int | None = None,
    num_key_value_heads: int | None = None,
    lpe: int | torch.Tensor | np.ndarray | None = 8,
    lpe_cache: bool | None = None,
) -> GraphLayout:
    """:func:`build_graph`'s graph as a :class:`~.pieces.GraphLayout` (arguments and checks the same): its block
    layout, node arrays and LPE, O(blocks + N) memory; the edges of any destination-row range are assembled on
    request. For graphs whose (E,) arrays do not fit in memory (a 1.24B-parameter model's are ~16 GB)."""
    named, entries, layout = build_layout(model, arch, num_heads, num_key_value_heads)
    arch = layout.arch
    rowptr = csr_rowptr(layout.blocks)
    nodes, _ = assemble_rows(entries, layout, named, arch, arch != "generic", rowptr, 0, 0)
    nodes.meta.update(
        num_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads, whole_num_edges=int(rowptr[-1])
    )
    nodes.lpe = _lpe(layout.blocks, nodes.num_nodes, lpe, lpe_cache)
    return GraphLayout(entries, layout, nodes, rowptr)


def _lpe(blocks, n_nodes: int, lpe, cache: bool | None) -> torch.Tensor | None:
    """The graph's LPE: None, a given (num_nodes, k) array, or k eigenvectors computed from the layout."""
    if lpe is None or lpe is False or (is_int(lpe) and lpe == 0):
        return None
    if isinstance(lpe, (np.ndarray, torch.Tensor)):
        check_not_meta(lpe, "build_graph", "lpe")  # a graph's LPE is a model input: it needs values
        t = torch.as_tensor(lpe, dtype=torch.float32)
        if t.dim() != 2 or t.shape[0] != n_nodes:
            raise ValueError(f"build_graph: lpe must be (num_nodes={n_nodes}, k), got {tuple(t.shape)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"build_graph: lpe has {bad} NaN/Inf values")
        return t.contiguous()
    if not is_int(lpe) or lpe < 0:
        err = ValueError if is_int(lpe) else InputTypeError
        raise err(f"build_graph: lpe must be an int >= 0, a (num_nodes, k) tensor or None, got {describe(lpe)}")
    return block_lpe(blocks, n_nodes, int(lpe), cache=cache)
