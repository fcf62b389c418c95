"""Parameter tensors -> the ordered list of *entries* a neural graph is laid out from.

An entry is one block of edges in the neural graph: a real parameter tensor (or a q/k/v slice of a fused one),
or an auxiliary structural block (residual ``.res`` and attention-head ``.headN`` connections) whose edge
features are constant. Each architecture expands the model's ``named_parameters()`` into entries the way the
official NiNo graphs do, so that node ids and edges match the official ones exactly; each real entry carries
the flat indices of its parameters in the concatenated parameter vector as a strided view description
(:class:`ParamIndex`), so no per-parameter array is ever built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamIndex:
    """Flat parameter indices of an entry, not stored: ``index[x] = offset + sum_d x[d] * strides[d]``.

    Every entry is a (slice of a) contiguous parameter tensor, so this is exact; ``materialize`` gives the
    tensor.
    """

    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def __getitem__(self, i: int) -> ParamIndex:  # a slice along the first dimension (like ``tensor[i]``)
        return ParamIndex(self.offset + i * self.strides[0], self.shape[1:], self.strides[1:])

    def select(self, dim: int, i: int) -> ParamIndex:
        """``tensor.select(dim, i)``."""
        return ParamIndex(
            self.offset + i * self.strides[dim],
            self.shape[:dim] + self.shape[dim + 1 :],
            self.strides[:dim] + self.strides[dim + 1 :],
        )

    def view(self, shape: tuple[int, ...]) -> ParamIndex:
        """A contiguous index reshaped (``tensor.view``)."""
        if self.strides != _contiguous(self.shape):
            raise ValueError(f"ParamIndex.view: index of shape {self.shape} is not contiguous")
        return _arange(self.offset, tuple(shape))

    def materialize(self) -> torch.Tensor:
        """int64 tensor of ``shape`` with the flat parameter indices."""
        out = torch.full(self.shape, self.offset, dtype=torch.int64)
        for d, (n, s) in enumerate(zip(self.shape, self.strides, strict=True)):
            out += (torch.arange(n) * s).view([-1 if k == d else 1 for k in range(len(self.shape))])
        return out


@dataclass
class Entry:
    """One block of the neural graph.

    name:   the (virtual) parameter name, e.g. ``h.0.attn.c_attn.q.weight`` for the q slice of a fused qkv.
    shape:  the (virtual) shape, laid out like the official graph sees it.
    params: where its parameters sit in the flat parameter vector, or None for an auxiliary block (features
            = 1).
    """

    name: str
    shape: tuple[int, ...]
    params: ParamIndex | None = None

    @property
    def index(self) -> torch.Tensor | None:
        """int64 tensor of ``shape`` with flat parameter indices (materialised; for tests and debugging)."""
        return None if self.params is None else self.params.materialize()


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= n
    return tuple(reversed(strides))


def _arange(offset: int, shape: tuple[int, ...]) -> ParamIndex:
    return ParamIndex(offset, tuple(shape), _contiguous(tuple(shape)))


def _suffix_names(names: dict[str, str]) -> dict[str, str]:
    """Complete an architecture's name table with the derived q/k/v bias, layer and value-residual names."""
    out = dict(names)
    for sfx in ("", "_q", "_k", "_v"):
        if f"attn{sfx}" not in out:
            continue
        w = out[f"attn{sfx}"]
        out[f"attn{sfx}_bias"] = w.replace("weight", "bias")
        if sfx:
            out[f"layer{sfx}"] = w[: w.rfind(".")]
        if sfx == "_v":
            out["value_res"] = w.replace("weight", "res")
    return out


# Name tables: which parameter-name suffixes play which role in each architecture.
NAMES: dict[str, dict[str, str]] = {
    "generic": {},
    "gpt2": _suffix_names(
        {
            "cls": "wte.weight",
            "pos": "wpe.weight",
            "attn": "attn.c_attn.weight",
            "attn_q": "attn.c_attn.q.weight",
            "attn_k": "attn.c_attn.k.weight",
            "attn_v": "attn.c_attn.v.weight",
            "mlp_res": "c_fc.bias",
        }
    ),
    "llama": _suffix_names(
        {
            "cls": "embed_tokens.weight",
            "attn_q": "self_attn.q_proj.weight",
            "attn_k": "self_attn.k_proj.weight",
            "attn_v": "self_attn.v_proj.weight",
            "mlp_res1": "mlp.gate_proj.weight",
            "mlp_res2": "mlp.up_proj.weight",
        }
    ),
    "bert": _suffix_names(
        {
            "cls": "word_embeddings.weight",
            "pos": "position_embeddings.weight",
            "type": "token_type_embeddings.weight",
            "attn_q": "attention.self.query.weight",
            "attn_k": "attention.self.key.weight",
            "attn_v": "attention.self.value.weight",
            "mlp_res": "intermediate.dense.bias",
        }
    ),
    "vit": _suffix_names(
        {
            "conv1": "conv_proj",
            "cls": "class_token",
            "cls_w": "class_token.weight",
            "pos": "pos_embedding",
            "pos_w": "pos_embedding.weight",
            "attn": "in_proj_weight",
            "attn_q": "in_proj_q.weight",
            "attn_k": "in_proj_k.weight",
            "attn_v": "in_proj_v.weight",
            "mlp_res": "mlp.0.bias",
        }
    ),
    "nanogpt": _suffix_names(
        {
            "cls": "embed.weight",
            "cls_w": "value_embeds.weight",
            "attn": "attn.qkv_w",
            "attn_q": "attn.qkv_w.q.weight",
            "attn_k": "attn.qkv_w.k.weight",
            "attn_v": "attn.qkv_w.v.weight",
            "mlp_res": "c_fc.weight",
        }
    ),
}
NAMES["qwen3"] = NAMES["llama"]

# GPT-2's Conv1D stores weights as (in, out); every other architecture as (out, in).
FIRST_DIM_OUT = {"gpt2": False}
TRANSFORMERS = ("gpt2", "llama", "qwen3", "bert", "vit", "nanogpt")
ARCHS = ("generic", *TRANSFORMERS)


def _res_entry(name: str, key: str, weight_shape: tuple[int, ...], first_dim_out: bool) -> Entry:
    """A residual block over the input neurons of the layer ``name`` belongs to."""
    n = weight_shape[1] if first_dim_out else weight_shape[0]
    return Entry(name.replace(key, "res"), (n,))


def expand(
    named_shapes: list[tuple[str, tuple[int, ...]]],
    arch: str,
    num_heads: int | None,
    num_kv_heads: int | None,
) -> list[Entry]:
    """Expand ``(name, shape)`` pairs (``named_parameters()`` order) into graph entries for ``arch``."""
    offsets, shapes, off = {}, {}, 0
    for name, shape in named_shapes:
        offsets[name], shapes[name] = off, shape
        off += math.prod(shape)
    if arch == "generic":
        return [Entry(n, s, _arange(offsets[n], s)) for n, s in named_shapes]
    names = NAMES[arch]
    fdo = FIRST_DIM_OUT.get(arch, True)
    # a dict: re-adding a name keeps its first position (the official graphs rely on it)
    out: dict[str, Entry] = {}

    def add(e: Entry) -> None:
        out.setdefault(e.name, e)

    if arch in ("gpt2", "vit", "nanogpt"):
        _expand_fused_qkv(named_shapes, arch, names, fdo, num_heads, offsets, shapes, add)
    else:
        _expand_split_qkv(named_shapes, arch, names, fdo, num_heads, num_kv_heads, offsets, shapes, add)
    return list(out.values())


def _expand_split_qkv(named_shapes, arch, names, fdo, num_heads, num_kv_heads, offsets, shapes, add):
    """Llama / Qwen3 / BERT: separate q, k, v projections; head blocks after q and v, a residual after v."""
    mlp_res = tuple(names[k] for k in ("mlp_res", "mlp_res1", "mlp_res2") if k in names)
    for name, shape in named_shapes:
        for sfx in ("q", "k", "v"):
            if name.endswith(names[f"attn_{sfx}"]):
                add(Entry(name, shape, _arange(offsets[name], shape)))
                if sfx in ("q", "v"):
                    heads = num_heads if (sfx == "q" or arch == "bert") else num_kv_heads
                    out_dim = shape[0] if fdo else shape[1]
                    for h in range(heads):
                        add(Entry(name.replace("weight", f"head{h}"), (out_dim // heads,)))
                bias = name.replace("weight", "bias")
                if bias in shapes:
                    add(Entry(bias, shapes[bias], _arange(offsets[bias], shapes[bias])))
                if sfx == "v":
                    add(_res_entry(name, "weight", shape, fdo))
            elif not name.endswith(names[f"attn_{sfx}_bias"]):
                add(Entry(name, shape, _arange(offsets[name], shape)))
                if name.endswith(mlp_res):
                    key = name[name.rfind(".") + 1 :]
                    add(_res_entry(name, key, shapes[name.replace(key, "weight")], fdo))


def _expand_fused_qkv(named_shapes, arch, names, fdo, num_heads, offsets, shapes, add):
    """GPT-2 / ViT / NanoGPT: one fused qkv tensor split into q, k, v slices (plus heads and a value
    residual)."""
    for name, shape in named_shapes:
        if name.endswith(names["attn"]):
            if arch == "nanogpt":  # (3, out, in)
                sub = (shape[1], shape[2])
                full = _arange(offsets[name], shape)
                slices = [full[i] for i in range(3)]
                head_dim_of = sub[1]
            elif fdo:  # ViT: (3 * out, in)
                sub = (shape[0] // 3, shape[1])
                full = _arange(offsets[name], (3, *sub))
                slices = [full[i] for i in range(3)]
                head_dim_of = sub[0]
            else:  # GPT-2 Conv1D: (in, 3 * out)
                sub = (shape[0], shape[1] // 3)
                full = _arange(offsets[name], (sub[0], 3, sub[1]))
                slices = [full.select(1, i) for i in range(3)]
                head_dim_of = sub[1]
            bias = name.replace("weight", "bias") if arch != "nanogpt" else None
            for i, sfx in enumerate(("q", "k", "v")):
                name_ = name.replace(names["attn"], names[f"attn_{sfx}"])
                add(Entry(name_, sub, slices[i]))
                if sfx in ("q", "v"):
                    for h in range(num_heads):
                        add(Entry(name_.replace("weight", f"head{h}"), (head_dim_of // num_heads,)))
                if bias is not None and bias in shapes:
                    nb = shapes[bias][0] // 3
                    add(Entry(name_.replace("weight", "bias"), (nb,), _arange(offsets[bias], (3, nb))[i]))
                if sfx == "v":
                    n_in = sub[1] if (fdo or arch == "nanogpt") else sub[0]
                    add(Entry(name_.replace("weight", "res"), (n_in,)))
            continue
        if name.endswith(names["attn_bias"]):  # the fused qkv bias was split above
            continue
        index = _arange(offsets[name], shape)
        vname, vshape = name, shape
        if arch == "vit" and name.endswith((names["cls"], names["cls_w"], names["pos"], names["pos_w"], "proj")):
            vname = name + ".weight"
            vshape = shape[1:] if len(shape) > 2 else ((1, shape[0]) if len(shape) == 1 else shape)
        elif arch == "nanogpt" and "value_embeds" in name:
            # value_embeds.0.weight -> 0.value_embeds.weight, to match 'value_embeds.weight'
            parts = name.split(".")
            vname = ".".join([parts[-2], *parts[:-2], parts[-1]])
        elif arch == "nanogpt" and name.endswith(("skip_weights", "lambdas")):
            vname = name + ".weight"
        add(Entry(vname, tuple(vshape), index.view(vshape)))
        if vname.endswith(names["mlp_res"]):
            key = vname[vname.rfind(".") + 1 :]
            add(_res_entry(vname, key, shapes[name.replace(key, "weight")], fdo))
