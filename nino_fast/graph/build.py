"""``build_graph``: a model (or its ``(name, shape)`` list) -> the official NiNo neural graph, as CSR."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .entries import ARCHS, NAMES, TRANSFORMERS, expand
from .layout import Layout
from .lpe import block_lpe
from .neural_graph import NeuralGraph, assemble, assemble_rows, csr_rowptr, row_ranges

NamedShapes = Iterable[tuple[str, "torch.Size | tuple[int, ...] | torch.Tensor"]]


def detect_arch(module: torch.nn.Module) -> tuple[str, int | None, int | None]:
    """(arch, num_heads, num_key_value_heads) of a known transformer module; ('generic', None, None)
    otherwise."""
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
    if cls_module.startswith("torchvision"):
        from torchvision.models import VisionTransformer

        if isinstance(module, VisionTransformer):
            return "vit", module.encoder.layers[0].num_heads, None
    names = [n for n, _ in module.named_parameters()]
    if any(n.endswith("attn.qkv_w") for n in names) and any("value_embeds" in n for n in names):
        heads = next((m.num_heads for m in module.modules() if hasattr(m, "num_heads")), None)
        return "nanogpt", heads, None
    return "generic", None, None


def _named_shapes(model) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(model, torch.nn.Module):
        model = model.named_parameters()
    elif isinstance(model, dict):
        model = model.items()
    out = []
    for name, p in model:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else tuple(int(d) for d in p)
        out.append((str(name), shape))
    return out


def _validate(named: list[tuple[str, tuple[int, ...]]], arch: str, num_heads, num_kv_heads) -> None:
    where = f"build_graph(arch={arch!r})"
    if arch not in ARCHS:
        raise ValueError(f"{where}: unknown arch; expected one of {list(ARCHS)}")
    if not named:
        raise ValueError(f"{where}: the model has no parameters")
    bad = [f"{n} {list(s)}" for n, s in named if len(s) == 0 or len(s) > 4 or math.prod(s) == 0]
    if bad:
        raise ValueError(
            f"{where}: unsupported parameter shapes (neural graphs take 1-D to 4-D, non-empty "
            f"tensors, e.g. no scalars or 3-D convs): {bad}"
        )
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate parameter names")
    if arch not in TRANSFORMERS:
        return
    if not num_heads or num_heads < 1:
        raise ValueError(f"{where}: num_heads is required for transformers (got {num_heads})")
    nm = NAMES[arch]
    attn = [n for n in names if n.endswith(nm.get("attn", nm["attn_q"]))]
    if not attn:
        raise ValueError(
            f"{where}: no attention parameters found (expected names ending with "
            f"{nm.get('attn', nm['attn_q'])!r}); parameter names: {names[:8]}..."
        )
    kv = num_kv_heads or num_heads
    if num_heads % kv:
        raise ValueError(f"{where}: num_heads={num_heads} is not a multiple of num_key_value_heads={kv}")


def build_layout(
    model, arch: str | None = None, num_heads: int | None = None, num_key_value_heads: int | None = None
) -> tuple[list, list, Layout]:
    """``(named shapes, entries, layout)`` of ``model`` (arguments as for :func:`build_graph`): the graph's
    block descriptors (``layout.blocks``) without any per-edge array, e.g. for :func:`~.lpe.block_lpe`
    alone."""
    if isinstance(model, torch.nn.Module) and arch is None:
        arch, heads, kv = detect_arch(model)
        num_heads = num_heads or heads
        num_key_value_heads = num_key_value_heads or kv
    arch = arch or "generic"
    named = _named_shapes(model)
    _validate(named, arch, num_heads, num_key_value_heads)
    kv = num_key_value_heads or num_heads
    entries = expand(named, arch, num_heads, kv)
    return named, entries, Layout(entries, arch, num_heads, kv).run()


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
        NeuralGraph in destination-sorted CSR form (see :class:`NeuralGraph`).
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
) -> tuple[NeuralGraph, torch.Tensor, tuple[int, int, int, int]]:
    """Part ``part`` of ``parts`` of :func:`build_graph`'s graph, built without the rest: ``(graph, ids,
    (node_lo, node_hi, edge_lo, edge_hi))``. The parts are :func:`row_ranges` (contiguous destination rows with
    ~E / parts edges each, as :func:`nino_fast.distributed.shard_bounds`). ``graph`` has all N nodes (node
    inputs: ``rowptr`` (N+1,), ``pos_w``, ``lpe``) but only the part's edges, numbered from 0 (other rows are
    empty; ``graph.meta["whole_num_edges"]``: E); ``graph.param_pos`` holds the slots of the parameters ``ids``
    (sorted; int32 where the values fit) on them. Memory: the part's edge arrays and O(N) per-node arrays; the LPE
    is computed matrix-free from the layout (or read from its cache) as for the whole graph."""
    if not (isinstance(parts, int) and parts >= 1 and isinstance(part, int) and 0 <= part < parts):
        raise ValueError(f"build_graph_part: part must be in 0..parts-1 with parts >= 1, got {part} of {parts}")
    named, entries, layout = build_layout(model, arch, num_heads, num_key_value_heads)
    arch = layout.arch
    rowptr = csr_rowptr(layout.blocks)
    bounds = row_ranges(rowptr, parts)[part]
    graph, ids = assemble_rows(entries, layout, named, arch, arch != "generic", rowptr, bounds[0], bounds[1])
    graph.meta.update(
        num_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads, whole_num_edges=int(rowptr[-1])
    )
    graph.lpe = _lpe(layout.blocks, graph.num_nodes, lpe, lpe_cache)
    return graph, ids, bounds


def _lpe(blocks, n_nodes: int, lpe, cache: bool | None) -> torch.Tensor | None:
    if lpe is None or lpe is False or (isinstance(lpe, int) and lpe == 0):
        return None
    if isinstance(lpe, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(lpe, dtype=torch.float32)
        if t.dim() != 2 or t.shape[0] != n_nodes:
            raise ValueError(f"build_graph: lpe must be (num_nodes={n_nodes}, k), got {tuple(t.shape)}")
        return t.contiguous()
    if not isinstance(lpe, int) or lpe < 0:
        raise ValueError(f"build_graph: lpe must be an int >= 0, a (num_nodes, k) tensor or None, got {lpe!r}")
    return block_lpe(blocks, n_nodes, lpe, cache=cache)
