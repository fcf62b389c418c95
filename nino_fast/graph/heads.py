"""Attention-head counts, checked against the widths the graph splits by them.

The graph gives each attention head of q and v its own block of ``width // heads`` neurons (:mod:`.entries`),
so a head count that does not divide the width would silently drop neurons and build a graph of the wrong
size; grouped-query counts must also divide ``num_heads``. Checked whether the counts were passed or read from
a model's config, before anything is laid out.
"""

from __future__ import annotations

from .checks import check_int
from .entries import NAMES, TRANSFORMERS

GQA = ("llama", "qwen3")  # architectures with grouped-query attention (num_key_value_heads < num_heads)


def _count(value, who: str, arg: str, origin: str) -> int | None:
    return None if value is None else check_int(value, who, f"{arg} ({origin})", lo=1)


def _fused_width(arch: str, name: str, shape: tuple[int, ...], who: str) -> int:
    """Width of one q/k/v slice of a fused weight that is split into heads (as :mod:`.entries` splits it)."""
    if arch == "nanogpt":  # (3, out, in); the head blocks follow the slice's second dimension
        ok, width, form = len(shape) == 3 and shape[0] == 3, shape[-1], "(3, out, in)"
    elif arch == "vit":  # (3 * out, in)
        ok, width, form = len(shape) == 2 and shape[0] % 3 == 0, shape[0] // 3, "(3 * out, in)"
    else:  # GPT-2 Conv1D: (in, 3 * out)
        ok, width, form = len(shape) == 2 and shape[-1] % 3 == 0, shape[-1] // 3, "(in, 3 * out)"
    if not ok:
        raise ValueError(f"{who}: the fused q/k/v weight {name!r} must have shape {form}, got {shape}")
    return width


def _splits(named, arch: str, num_heads: int, num_kv_heads: int, who: str):
    """``(name, shape, width, heads, arg)`` for every weight whose output width is split into heads."""
    nm = NAMES[arch]
    for name, shape in named:
        if arch in ("gpt2", "vit", "nanogpt"):
            if name.endswith(nm["attn"]):
                yield name, shape, _fused_width(arch, name, shape, who), num_heads, "num_heads"
            continue
        if name.endswith(nm["attn_q"]):
            yield name, shape, shape[0], num_heads, "num_heads"
        elif name.endswith((nm["attn_k"], nm["attn_v"])):
            kv = arch in GQA
            yield name, shape, shape[0], num_kv_heads, "num_key_value_heads" if kv else "num_heads"


def check_heads(named, arch: str, num_heads, num_kv_heads, origin: dict[str, str]) -> tuple[int | None, int | None]:
    """``(num_heads, num_key_value_heads)`` as ints (key/value heads default to ``num_heads``), after checking
    that they are positive ints, that key/value heads divide ``num_heads`` (and equal it where the architecture
    has no grouped-query attention) and that each divides every width it splits. ``origin[arg]`` says where a
    count came from (``passed`` / ``detected from the model config``), for the messages."""
    who = f"build_graph(arch={arch!r})"
    h = _count(num_heads, who, "num_heads", origin["num_heads"])
    kv = _count(num_kv_heads, who, "num_key_value_heads", origin["num_key_value_heads"])
    if arch not in TRANSFORMERS:
        return h, kv
    if h is None:
        raise ValueError(f"{who}: num_heads is required for transformers (got None)")
    if kv is None:
        kv = h
    if arch not in GQA and kv != h:
        raise ValueError(
            f"{who}: num_key_value_heads must be None or equal to num_heads={h} ({arch} has no grouped-query "
            f"attention), got {kv} ({origin['num_key_value_heads']})"
        )
    if h % kv:
        raise ValueError(
            f"{who}: num_heads={h} is not a multiple of num_key_value_heads={kv} "
            f"({origin['num_heads']}, {origin['num_key_value_heads']})"
        )
    for name, shape, width, heads, arg in _splits(named, arch, h, kv, who):
        if width % heads:
            raise ValueError(
                f"{who}: {arg}={heads} ({origin[arg]}) does not divide the width {width} that {name!r} "
                f"(shape {shape}) splits into heads; expected a divisor of {width}"
            )
    return h, kv
