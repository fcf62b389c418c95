"""Placement of graph entries on neuron ids: the official NiNo neural-graph layout, as one state machine.

Neurons are numbered as the official implementation numbers them: each entry is a dense bipartite block
``rows x cols`` (or a diagonal block for residuals) placed by running row/column offsets, then every block's
columns are shifted by the number of bias/norm/embedding "extra input neurons" that precede it. The quirks of
the official layouts (fused-qkv bias rows, transposed key blocks, per-head columns, Qwen3 q/k-norm, BERT's
decoder bias, NanoGPT's value embeddings and lambdas, ViT's patch embedding) are reproduced because node ids,
the edge multiset and the parameter <-> edge mapping must equal the official graph's.

Output: one :class:`~.blocks.Block` descriptor per entry (a rectangle or diagonal of node ids, its edge type
and entry), in the official construction order; all of the official arithmetic on edge tensors (column shifts,
head offsets, key transposes, the Qwen3/BERT/NanoGPT/ViT corrections) is done on the descriptors, since every
edit keeps a block a contiguous range. ``materialize()`` gives the explicit edges for tests and debugging.
"""

from __future__ import annotations

import torch

from .blocks import Block, materialize, split_by_runs
from .checks import values_per_edge
from .entries import FIRST_DIM_OUT, NAMES, Entry

# edge types (the official numbering)
FC, BIAS, CONV, NORM, WTE, WPE, ATTN_Q, ATTN_K, ATTN_V = 1, 2, 3, 4, 5, 6, 7, 8, 9
RESIDUAL, HEAD, SELF_LOOP = 10, 11, 13


def _ends(name: str, names: dict[str, str], *keys: str) -> bool:
    # a missing role never matches (the official code looks up ' ', which no parameter name ends with)
    return name.endswith(tuple(names[k] for k in keys if k in names))


def param_type(name: str, shape: tuple[int, ...], arch: str) -> int:
    """Edge type of an entry, from its name and shape (official rules, in their order)."""
    is_w, is_b, nd = name.endswith(".weight"), name.endswith(".bias"), len(shape)
    if arch == "generic":
        if nd == 1 and is_w:
            return NORM
        if nd == 4:
            return CONV
        if nd == 2:
            return FC
        if not is_w and ".res" in name:
            return RESIDUAL
        if not is_w and ".self_loop" in name:
            return SELF_LOOP
        return BIAS
    names = NAMES[arch]
    rules = (
        (nd == 1 and is_w, NORM),
        (nd in (2, 3) and _ends(name, names, "cls", "cls_w"), WTE),
        (nd in (2, 3) and _ends(name, names, "pos", "pos_w"), WPE),
        (nd == 2 and _ends(name, names, "attn_q"), ATTN_Q),
        (nd == 2 and _ends(name, names, "attn_k"), ATTN_K),
        (nd == 2 and _ends(name, names, "attn_v"), ATTN_V),
        (nd == 4, CONV),
        (nd == 2 and "embed" not in name, FC),
        (not is_w and not is_b and ".head" in name, HEAD),
        (not is_w and not is_b and ".self_loop" in name, SELF_LOOP),
        (not is_w and not is_b and ".res" in name, RESIDUAL),
    )
    return next((t for cond, t in rules if cond), BIAS)


def _split(name: str) -> tuple[str, str]:
    i = name.rfind(".")  # no dot: the official split gives (name[:-1], name); kept for identical grouping
    return name[:i], name[i + 1 :]


class Layout:
    """Runs the placement for one architecture.

    After ``run()``: ``blocks`` is the list of block descriptors in the official construction order (each with
    its edge type and entry index), ``max_feat`` the feature slots per edge.
    """

    def __init__(self, entries: list[Entry], arch: str, num_heads: int | None, num_kv_heads: int | None):
        self.entries, self.arch = entries, arch
        self.names = NAMES[arch]
        self.fdo = FIRST_DIM_OUT.get(arch, True)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.shapes = {e.name: e.shape for e in entries}
        self.by_name: dict[str, dict[str, Block]] = {}  # layer -> key -> block; insertion order matters
        # column offset -> [(extra columns, layer, key)]
        self.same: dict[int, list[tuple[int, str, str]]] = {}
        self.types: list[int] = []
        self.max_feat = 1
        self.blocks: list[Block] = []

    # ---- the common part -----------------------------------------------------------------------------------
    def _record(self, c_off: int, weight: int, layer: str, key: str, block: Block, t: int, shape) -> None:
        block.entry = len(self.types)
        self.by_name.setdefault(layer, {})[key] = block
        self.same.setdefault(c_off, []).append((weight, layer, key))
        self.types.append(t)
        self.max_feat = max(self.max_feat, values_per_edge(shape))

    def run(self) -> Layout:
        (self._place_generic if self.arch == "generic" else self._place_transformer)()
        # The official graph concatenates blocks grouped by layer (first-seen order) but lists the types in
        # entry order; split_by_runs gives every edge the type the official graph gives it, whether or not
        # they agree.
        ordered = [b for keys in self.by_name.values() for b in keys.values()]
        sizes = [e.shape[0] * (e.shape[1] if len(e.shape) > 1 else 1) for e in self.entries]
        if sum(sizes) != sum(b.num_edges for b in ordered):
            raise AssertionError(f"layout produced {sum(b.num_edges for b in ordered)} edges but {sum(sizes)} types")
        self.blocks = split_by_runs(ordered, self.types, sizes)
        return self

    def materialize(self) -> torch.Tensor:
        """(2, E') int64 explicit edges in the official order, self-loops excluded (tests and debugging)."""
        return materialize(self.blocks)

    def _place_generic(self) -> None:
        c_off = r_off = 0
        for layer_idx, e in enumerate(self.entries):
            sz = e.shape
            t = param_type(e.name, sz, "generic")
            layer, key = _split(e.name)
            n_out, n_in = sz[0], (sz[1] if len(sz) > 1 else 1)
            if not self.fdo and len(sz) >= 2:
                n_in, n_out = n_out, n_in
            if len(sz) == 1:
                c_off = max(0, c_off - n_out)  # a bias/norm acts on the neurons of the previous block
            elif layer_idx == 0:
                c_off = n_in
            extra = int(len(sz) == 1 and t != RESIDUAL)
            self._record(c_off, extra, layer, key, Block(r_off, c_off, n_in, n_out), t, sz)
            r_off += n_in
            c_off += n_out
        col = 0
        for c in self.same:  # insertion order (the generic graph does not sort)
            col += sum(w for w, _, _ in self.same[c])
            for _, layer, key in self.same[c]:
                self.by_name[layer][key].shift_dst(col)

    def _place_transformer(self) -> None:
        nm, H = self.names, self.num_heads
        c_off = r_off = 0
        c_q = r_qv = c_v = c_v_end = 0
        q_bias = k_bias = v_bias = False
        for layer_idx, e in enumerate(self.entries):
            name, sz = e.name, e.shape
            t = param_type(name, sz, self.arch)
            layer, key = _split(name)
            n_out, n_in = sz[0], (sz[1] if len(sz) > 1 else 1)
            if (not self.fdo and len(sz) >= 2) or _ends(name, nm, "cls", "cls_w", "pos", "pos_w", "type"):
                n_in, n_out = n_out, n_in
            if len(sz) == 1 and key != "res":
                c_off = max(0, c_off - n_out)
            elif layer_idx == 0:
                c_off = n_in
            is_embed = t == WPE or _ends(name, nm, "type")
            if is_embed:
                c_off -= n_out  # positional/type embeddings feed the same neurons as the word embedding
            elif name.endswith(nm["attn_q"]):
                # the official graph tests the *key* bias for both q and k
                q_bias = k_bias = name.replace(nm["attn_q"], nm["attn_k_bias"]) in self.shapes
                v_bias = name.replace(nm["attn_q"], nm["attn_v_bias"]) in self.shapes
                r_off += int(k_bias)
                c_q, r_qv, c_v = c_off, r_off, c_off + n_out
            elif name.endswith(nm["attn_k"]):
                c_off, r_off = c_q, r_qv
            elif name.endswith(nm["attn_v"]):
                c_off, r_off = c_v, r_qv
                c_v_end = c_off + n_out
            elif name.endswith(nm["attn_q_bias"]):
                c_off, r_off = c_q, r_qv + n_out + H
            elif name.endswith(nm["attn_k_bias"]):
                c_off, r_off = c_q - n_out, r_qv - 1
            elif name.endswith(nm["attn_v_bias"]):
                c_off = c_v
                r_off = r_qv + n_out + H + int(name.replace(nm["attn_v_bias"], nm["attn_q_bias"]) in self.shapes)
            elif t == HEAD:
                c_off = c_q if layer.endswith(nm["layer_q"]) else c_v
            else:
                c_off, r_off = self._move_offset(name, c_off, r_off, n_out, n_in)

            if key == "res":
                if name.endswith(nm["value_res"]):
                    r_off, c_off = r_qv, c_v_end
                else:
                    r_off -= n_out + int(v_bias)
                block = Block(r_off, c_off, n_out, n_out, diag=True)
            else:
                block = Block(r_off, c_off, n_in, n_out)
            extra = 1 if (len(sz) == 1 or (t == ATTN_Q and q_bias)) and t != RESIDUAL else (n_in if is_embed else 0)
            self._record(c_off, extra, layer, key, block, t, sz)

            if key == "res":
                c_off -= n_out  # the next block keeps this column offset
                if name.endswith(nm["value_res"]):
                    r_off += n_out + H + c_v_end - c_v + int(k_bias) + int(v_bias) - 1
                else:
                    r_off += n_out - int(not v_bias)
            r_off += n_in
            c_off += n_out

        self._correct_offsets()
        col = 0
        for c in sorted(self.same):
            col += sum(w for w, _, _ in self.same[c])
            for _, layer, key in self.same[c]:
                is_w, is_b = key.endswith("weight"), key.endswith("bias")
                if layer.endswith(nm["layer_v"]) and is_w:
                    col -= self.num_kv_heads + v_bias
                blk = self.by_name[layer][key]
                blk.shift_dst(col)
                if "head" in key and not is_w and not is_b:
                    blk.shift_dst(int(key[key.find("head") + 4 :]) * blk.num_edges)
                elif layer.endswith(nm["layer_k"]) and is_w:
                    blk.transposed = not blk.transposed  # key weights are transposed (q·k pairs neurons)

    # ---- architecture hooks --------------------------------------------------------------------------------
    def _move_offset(self, name: str, c_off: int, r_off: int, n_out: int, n_in: int) -> tuple[int, int]:
        arch = self.arch
        if arch in ("llama", "qwen3"):
            # gate_proj and up_proj act element-wise on the same neurons
            if name.endswith("gate_proj.weight"):
                c_off += n_in
            elif name.endswith("up_proj.weight"):
                c_off -= n_out
            if arch == "qwen3" and name.endswith("_norm.weight"):
                r_off -= 1  # q_norm / k_norm are re-placed in _correct_offsets
        elif arch == "bert" and name.endswith("cls.predictions.bias"):
            r_off -= 1
        elif arch == "vit" and name.endswith(self.names["conv1"] + ".weight"):
            c_off -= n_out
        elif arch == "nanogpt":
            c_off = self._move_offset_nanogpt(name, c_off, n_out)
        return c_off, r_off

    def _move_offset_nanogpt(self, name: str, c_off: int, n_out: int) -> int:
        nm, shapes = self.names, self.shapes
        if name.endswith(("skip_weights", "skip_weights.weight")):
            n_value_embeds = sum(e.name.endswith(nm["cls_w"]) for e in self.entries)
            return c_off + shapes[nm["cls"]][0] * (n_value_embeds + 1) + 1
        if name.endswith(("lambdas", "lambdas.weight")):
            if "attn." in name or nm["cls"] in shapes:
                return c_off - 1
            first_2d = next((s for s in shapes.values() if len(s) >= 2), None)
            return c_off + first_2d[-1] - 2 if first_2d is not None else c_off
        if name.endswith("attn.c_proj.weight"):
            return c_off + 2
        if name.endswith(nm["cls"]):
            return c_off - shapes["skip_weights.weight"][0]
        if name.endswith(nm["cls_w"]):
            return c_off - n_out  # value embeddings align with the token embedding
        return c_off

    def _move_entries(self, moves: list[tuple[int, int]], select, weight) -> None:
        """Move selected (weight, layer, key) records from column offset ``old`` to ``new``.

        The official code removes from the list it iterates, which skips the record after each removed one;
        the same iteration is kept here on purpose, since it decides which columns get shifted.
        """
        for old, new in moves:
            for rec in self.same[old]:
                w, layer, key = rec
                if select(layer, key):
                    self.same.setdefault(new, []).append((weight(w, layer, key), layer, key))
                    self.same[old].remove(rec)

    def _correct_offsets(self) -> None:
        arch, blocks = self.arch, self.by_name
        if arch == "qwen3":
            self._correct_qwen3()
        elif arch == "bert":
            self._correct_bert()
        elif arch == "vit":
            for c, recs in self.same.items():
                self.same[c] = [
                    (blocks[layer][key].last_edge()[0] - blocks[layer][key].first_edge()[0] + 1, layer, key)
                    if (layer == self.names["conv1"] and key == "weight")
                    else (w, layer, key)
                    for w, layer, key in recs
                ]
        elif arch == "nanogpt":
            moves = []
            for c, recs in self.same.items():
                for _, layer, key in recs:
                    if f"{layer}.{key}".endswith(self.names["value_res"]):
                        blocks[layer][key].shift_dst(1)  # one column right of the attention lambdas
                        moves.append((c, c + 1))
            is_vres = lambda layer, key: f"{layer}.{key}".endswith(self.names["value_res"])  # noqa: E731
            self._move_entries(moves, is_vres, lambda w, layer, key: w)

    def _correct_qwen3(self) -> None:
        """q_norm / k_norm weights become connections between neurons inside the q / k projections."""
        blocks, moves, first_qk = self.by_name, [], {}
        for c, recs in self.same.items():
            for _, layer, key in recs:
                full = f"{layer}.{key}"
                if full.endswith(("q_proj.weight", "k_proj.weight")):
                    first_qk.setdefault(layer, blocks[layer][key])
                elif full.endswith(("q_norm.weight", "k_norm.weight")):
                    proj = first_qk[layer.replace("_norm", "_proj")]
                    lo, hi = proj.src_range()
                    dim = hi - lo
                    r0, c0 = proj.first_edge()
                    blk = blocks[layer][key]
                    hd = blk.num_edges
                    if layer.endswith("q_norm"):
                        rows, col0 = r0 + dim + self.num_heads, c0 + hd
                    else:
                        rows, col0 = r0, c0 + hd - dim
                    # the norm's hd edges become the diagonal rows+i -> col0+i (same edge order)
                    blk.r0, blk.c0, blk.n_rows, blk.n_cols = rows, col0, hd, hd
                    blk.diag, blk.transposed, blk.kstride = True, False, hd
                    moves.append((c, col0))
        self._move_entries(
            moves,
            lambda layer, key: (
                f"{layer}.{key}".endswith("_norm.weight") or layer.endswith(("q_proj", "k_proj", "v_proj"))
            ),
            lambda w, layer, key: 0 if f"{layer}.{key}".endswith("_norm.weight") else w,
        )

    def _correct_bert(self) -> None:
        """The decoder bias connects to the word-embedding neurons (it has one value per vocabulary token)."""
        blocks = self.by_name
        if "bias" not in blocks.get("cls.predictions", {}):
            return
        c0 = min(self.same)
        col = c0 + sum(w for w, _, _ in self.same[c0])
        blk = blocks["cls.predictions"]["bias"]
        lo, hi = blk.src_range()
        if hi - lo != 1:
            raise AssertionError(f"BERT decoder bias: expected one source row, got {blk}")
        blk.shift_src(max(0, col - 1) - lo)  # all sources become one node
        blk.shift_dst(-blk.first_edge()[1])
        blk.transposed = not blk.transposed
        for layer, keys in blocks.items():
            for key, b in keys.items():
                b.shift_dst(1)
                if (
                    "bert.embeddings" not in layer
                    and not layer.endswith("cls.predictions")
                    and not (layer.endswith("bert.encoder.layer.0.attention.self.key") and key == "bias")
                ):
                    b.shift_src(1)
        for c in self.same:
            self.same[c] = [r for r in self.same[c] if not (r[1] == "cls.predictions" and r[2] == "bias")]
