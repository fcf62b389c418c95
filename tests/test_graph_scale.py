"""Scalable graph construction: the block-descriptor CSR build equals the explicit build, the matrix-free LPE
equals the explicit-matrix LPE, overlapping blocks count once, the LPE cache."""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from nino_fast.graph import Block, block_lpe, build_graph, compute_lpe, laplacian_eigs
from nino_fast.graph import adjacency as adjacency_mod
from nino_fast.graph import assemble as assemble_mod
from nino_fast.graph import lpe as lpe_mod
from nino_fast.graph.adjacency import BlockAdjacency, shifted_normalized_operator
from nino_fast.graph.blocks import materialize
from nino_fast.graph.build import build_layout
from nino_fast.graph.lpe import block_laplacian_eigs, normalized_laplacian

from golden import CASES, load

GRAPH_CASES = [c for c in CASES if c not in ("mlp_wnn", "gpt2_posw")]
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ---- model configurations ----------------------------------------------------------------------------------
def _hf(arch: str, rng: random.Random):
    """(named shapes, kwargs) of a random tiny Hugging Face model built on the meta device."""
    h = rng.choice([1, 2, 4])
    kv = h // rng.choice([1, 2]) if h % 2 == 0 else h
    d, n_layers, vocab = h * rng.choice([2, 4]), rng.choice([1, 2, 3]), rng.choice([7, 20, 33])
    ff = rng.choice([2 * d, 4 * d, 10])
    tf = transformers
    with torch.device("meta"):
        if arch == "gpt2":
            m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=d, n_layer=n_layers, n_head=h, vocab_size=vocab, n_positions=9))
        elif arch == "llama":
            m = tf.LlamaForCausalLM(
                tf.LlamaConfig(
                    hidden_size=d,
                    intermediate_size=ff,
                    num_hidden_layers=n_layers,
                    num_attention_heads=h,
                    num_key_value_heads=kv,
                    vocab_size=vocab,
                    tie_word_embeddings=rng.random() < 0.5,
                    attention_bias=rng.random() < 0.5,
                )
            )
        elif arch == "qwen3":
            m = tf.Qwen3ForCausalLM(
                tf.Qwen3Config(
                    hidden_size=d,
                    intermediate_size=ff,
                    num_hidden_layers=n_layers,
                    num_attention_heads=h,
                    num_key_value_heads=kv,
                    head_dim=rng.choice([2, 4]),
                    vocab_size=vocab,
                )
            )
        else:
            m = tf.BertForMaskedLM(
                tf.BertConfig(
                    hidden_size=d,
                    intermediate_size=ff,
                    num_hidden_layers=n_layers,
                    num_attention_heads=h,
                    vocab_size=vocab,
                    max_position_embeddings=9,
                )
            )
    kw = {"num_heads": h} | ({"num_key_value_heads": kv} if arch in ("llama", "qwen3") else {})
    return [(n, tuple(p.shape)) for n, p in m.named_parameters()], kw


def _vit(rng: random.Random):
    """torchvision-style VisionTransformer parameter names (torchvision is not a test dependency)."""
    h = rng.choice([1, 2, 4])
    d, mlp, patch = h * rng.choice([2, 4]), rng.choice([8, 12]), rng.choice([2, 3])
    named = [
        ("class_token", (1, 1, d)),
        ("conv_proj.weight", (d, rng.choice([1, 3]), patch, patch)),
        ("conv_proj.bias", (d,)),
        ("encoder.pos_embedding", (1, rng.choice([2, 5]), d)),
    ]
    for i in range(rng.choice([1, 2])):
        p = f"encoder.layers.encoder_layer_{i}."
        named += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "self_attention.in_proj_weight", (3 * d, d)),
            (p + "self_attention.in_proj_bias", (3 * d,)),
            (p + "self_attention.out_proj.weight", (d, d)),
            (p + "self_attention.out_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.0.weight", (mlp, d)),
            (p + "mlp.0.bias", (mlp,)),
            (p + "mlp.3.weight", (d, mlp)),
            (p + "mlp.3.bias", (d,)),
        ]
    named += [
        ("encoder.ln.weight", (d,)),
        ("encoder.ln.bias", (d,)),
        ("heads.head.weight", (5, d)),
        ("heads.head.bias", (5,)),
    ]
    return named, {"num_heads": h}


def _nanogpt(rng: random.Random):
    """modded-NanoGPT parameter names, in the golden's order."""
    h = rng.choice([1, 2])
    d, vocab, n_layers = 4 * h, rng.choice([11, 13]), rng.choice([2, 4])
    named = [("skip_weights", (n_layers // 2,)), ("embed.weight", (vocab, d))]
    named += [(f"value_embeds.{i}.weight", (vocab, d)) for i in range(3)]
    for i in range(n_layers):
        p = f"blocks.{i}."
        named += [
            (p + "lambdas", (2,)),
            (p + "attn.qkv_w", (3, d, d)),
            (p + "attn.lambdas", (2,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "mlp.c_fc.weight", (4 * d, d)),
            (p + "mlp.c_proj.weight", (d, 4 * d)),
        ]
    named += [("lm_head.weight", (-(-vocab // d) * d, d))]
    return named, {"num_heads": h}


def _configs():
    rng = random.Random(0)
    out = [(f"golden-{c}", load(c)["named"], load(c)["arch"], load(c)["kwargs"]) for c in GRAPH_CASES]
    for t in range(3):
        for arch in ("gpt2", "llama", "qwen3", "bert"):
            out.append((f"{arch}-{t}", *_hf_with_arch(arch, rng)))
        out.append((f"vit-{t}", *_with_arch("vit", _vit(rng))))
        out.append((f"nanogpt-{t}", *_with_arch("nanogpt", _nanogpt(rng))))
    # layer names that interleave (a top-level "w1", then module "w"): block order != entry order, types split
    out.append(
        (
            "generic-interleaved",
            [("w1", (4, 3)), ("x", (3,)), ("w.weight", (2, 4)), ("w.bias", (2,))],
            "generic",
            {},
        )
    )
    return out


def _with_arch(arch, named_kw):
    return named_kw[0], arch, named_kw[1]


def _hf_with_arch(arch, rng):
    return _with_arch(arch, _hf(arch, rng))


CONFIGS = _configs()
IDS = [c[0] for c in CONFIGS]


# ---- the explicit reference build (materialised edges, stable sort by destination) -------------------------
def _reference(named, arch, kw):
    """(src, dst, type) in CSR order and per parameter (src, dst, type, slot) from materialised blocks."""
    _, entries, layout = build_layout(named, arch, kw.get("num_heads"), kw.get("num_key_value_heads"))
    ei = layout.materialize()
    types = torch.cat([torch.full((b.num_edges,), b.etype) for b in layout.blocks])
    n = int(ei.max()) + 1
    loops = torch.arange(n)
    ei = torch.cat((ei, torch.stack((loops, loops))), 1)
    types = torch.cat((types, torch.full((n,), 13)))
    feat = layout.max_feat
    start, pos = {}, 0
    for b in layout.blocks:
        start.setdefault(b.entry, pos - b.k0)  # an entry's pieces are consecutive; its edge k is at start + k
        pos += b.num_edges
    n_params = sum(int(np.prod(s)) for _, s in named)
    edge_of, slot_of = torch.full((n_params,), -1), torch.full((n_params,), -1)
    for t, e in enumerate(entries):
        if e.params is None:
            continue
        idx = e.index
        idx = idx.flatten(2) if idx.dim() > 2 else (idx.view(-1, 1, 1) if idx.dim() == 1 else idx.unsqueeze(2))
        if layout.fdo:
            idx = idx.permute(1, 0, 2)
        idx = idx.reshape(-1, idx.shape[2])
        edge_of[idx] = (start[t] + torch.arange(idx.shape[0])).unsqueeze(1).expand_as(idx)
        slot_of[idx] = torch.arange(idx.shape[1]).unsqueeze(0).expand_as(idx)
    assert bool((edge_of >= 0).all())
    per_param = torch.stack((ei[0][edge_of], ei[1][edge_of], types[edge_of], slot_of))
    return ei, types, per_param, feat


def _sorted_triples(src, dst, types):
    key = (src.long() * (1 << 40)) + dst.long() * 256 + types.long()
    return key.sort().values


@pytest.mark.parametrize("name, named, arch, kw", CONFIGS, ids=IDS)
def test_block_build_equals_explicit_build(name, named, arch, kw):
    g = build_graph(named, arch=arch, lpe=0, **kw)
    ei, types, per_param, feat = _reference(named, arch, kw)
    assert g.max_feat_size == feat and g.num_nodes == int(ei.max()) + 1
    assert torch.equal(_sorted_triples(g.src, g.dst, g.edge_type), _sorted_triples(ei[0], ei[1], types))
    e = torch.div(g.param_pos, feat, rounding_mode="floor")
    mine = torch.stack((g.src[e].long(), g.dst[e].long(), g.edge_type[e], g.param_pos % feat))
    assert torch.equal(mine, per_param)
    # perm (computed on request) maps CSR slots back to the construction order
    perm = g.perm
    assert torch.equal(ei[0][perm], g.src.long()) and torch.equal(ei[1][perm], g.dst.long())
    assert torch.equal(types[perm], g.edge_type)
    assert g.edge_type_u8.dtype == torch.uint8 and g.edge_type.dtype == torch.int64


@pytest.mark.parametrize("case", ["llama", "qwen3", "bert", "convnet"])
def test_chunked_fill_is_chunk_size_independent(case, monkeypatch):
    """Tiny chunks cut every block in rows and columns: same arrays, bit for bit."""
    g = load(case)
    ref = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    monkeypatch.setattr(assemble_mod, "CHUNK", 5)
    small = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    for a in ("rowptr", "src", "dst", "edge_type_u8", "param_pos"):
        assert torch.equal(getattr(ref, a), getattr(small, a)), a


def test_blocks_are_compact_descriptors():
    g = load("llama")
    graph = build_graph(g["named"], arch="llama", lpe=0, **g["kwargs"])
    assert all(isinstance(b, Block) for b in graph.blocks)
    assert sum(b.num_edges for b in graph.blocks) + graph.num_nodes == graph.num_edges
    assert {b.diag for b in graph.blocks} == {True, False} and any(b.transposed for b in graph.blocks)


# ---- matrix-free adjacency ---------------------------------------------------------------------------------
def _explicit_adjacency(src, dst, n):
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    keep = src != dst
    a = sp.coo_matrix((np.ones(int(keep.sum())), (src[keep], dst[keep])), shape=(n, n)).tocsr()
    return ((a + a.T) > 0).astype(np.float64).tocsr()


@pytest.mark.parametrize("name, named, arch, kw", CONFIGS, ids=IDS)
def test_block_adjacency_equals_explicit(name, named, arch, kw, z_mode):
    g = build_graph(named, arch=arch, lpe=0, **kw)
    adj = BlockAdjacency(g.blocks, g.num_nodes)
    ref = _explicit_adjacency(g.src.numpy(), g.dst.numpy(), g.num_nodes)
    assert np.array_equal(adj.dense(), ref.toarray())
    assert adj.num_undirected_edges == ref.nnz // 2
    x = np.random.default_rng(0).standard_normal((g.num_nodes, 2))
    assert np.allclose(adj.matmat(x), ref @ x, rtol=0, atol=1e-12)


OVERLAPS = {
    "duplicate dense": [Block(0, 5, 3, 4), Block(0, 5, 3, 4)],
    "q vs transposed k": [Block(0, 4, 4, 6), Block(0, 6, 4, 2, transposed=True), Block(4, 10, 6, 2)],
    "reverse direction": [Block(0, 4, 4, 3), Block(4, 0, 3, 4)],
    "self-overlapping": [Block(2, 0, 5, 6)],  # rows and columns share nodes 2..5: self-loops and both directions
    "diag in dense": [Block(0, 4, 4, 4), Block(0, 4, 4, 4, diag=True), Block(1, 6, 5, 5, diag=True)],
    "diag vs diag": [
        Block(0, 3, 5, 5, diag=True),
        Block(3, 0, 4, 4, diag=True),
        Block(2, 5, 6, 6, diag=True),
        Block(1, 1, 3, 3, diag=True),
    ],
    "diag crossing cells": [
        Block(0, 6, 3, 2),
        Block(5, 9, 4, 3),
        Block(0, 7, 9, 9, diag=True, transposed=True),
    ],
}


@pytest.fixture(params=["dense-Z", "sparse-Z"])
def z_mode(request, monkeypatch):
    """Run a test with the interval matrix Z dense (small graphs) and sparse (graphs with many blocks)."""
    if request.param == "sparse-Z":
        monkeypatch.setattr(adjacency_mod, "DENSE_CELLS_MAX", 0)
    return request.param


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_overlapping_blocks_count_once(case, z_mode):
    blocks = OVERLAPS[case]
    ei = materialize(blocks)
    n = int(ei.max()) + 1
    adj = BlockAdjacency(blocks, n)
    assert np.array_equal(adj.dense(), _explicit_adjacency(ei[0], ei[1], n).toarray())
    lap = normalized_laplacian(ei[0].numpy(), ei[1].numpy(), n).toarray()
    op, _ = shifted_normalized_operator(adj)
    assert np.allclose(op @ np.eye(n), 2 * np.eye(n) - lap, rtol=0, atol=1e-14)


def test_random_overlapping_blocks(z_mode):
    rng = np.random.default_rng(7)
    for _ in range(40):
        blocks = []
        for _ in range(rng.integers(1, 7)):
            nr, nc = int(rng.integers(1, 6)), int(rng.integers(1, 6))
            diag = bool(rng.random() < 0.4)
            blocks.append(
                Block(
                    int(rng.integers(0, 12)),
                    int(rng.integers(0, 12)),
                    nr,
                    nr if diag else nc,
                    diag,
                    bool(rng.random() < 0.3),
                )
            )
        ei = materialize(blocks)
        n = int(ei.max()) + 1
        assert np.array_equal(BlockAdjacency(blocks, n).dense(), _explicit_adjacency(ei[0], ei[1], n).toarray())


# ---- matrix-free LPE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen3"])
def test_dense_path_bit_identical_to_explicit(case):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=8, **g["kwargs"])
    assert torch.equal(graph.lpe, compute_lpe(graph.src.numpy(), graph.dst.numpy(), graph.num_nodes, 8))


def _eig_quality(lap, vals, vecs):
    resid = np.linalg.norm(lap @ vecs - vecs * vals, axis=0)
    return resid.max(), np.abs(np.linalg.norm(vecs, axis=0) - 1).max()


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen3", "bert"])
def test_matrix_free_solver_matches_explicit(case, monkeypatch):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=0, **g["kwargs"])
    monkeypatch.setattr(lpe_mod, "DENSE_MAX_NODES", 20)  # force ARPACK on both sides
    vals, vecs = block_laplacian_eigs(graph.blocks, graph.num_nodes, 6)
    ref_vals, _ = laplacian_eigs(graph.src.numpy(), graph.dst.numpy(), graph.num_nodes, 6)
    lap = normalized_laplacian(graph.src.numpy(), graph.dst.numpy(), graph.num_nodes)
    assert np.allclose(vals, ref_vals, atol=1e-9)
    assert np.allclose(vals, np.linalg.eigvalsh(lap.toarray())[:7], atol=1e-9)
    resid, norm_err = _eig_quality(lap, vals, vecs)
    assert resid < 1e-6 and norm_err < 1e-9
    again = block_lpe(graph.blocks, graph.num_nodes, 6, cache=False)
    assert torch.equal(again, block_lpe(graph.blocks, graph.num_nodes, 6, cache=False))  # bit-identical


def test_million_edge_llama_matrix_free_vs_explicit():
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=7000,
                tie_word_embeddings=False,
            )
        )
    graph = build_graph(m, lpe=0)
    assert graph.num_edges > 1_000_000
    src, dst, n = graph.src.numpy(), graph.dst.numpy(), graph.num_nodes
    adj = BlockAdjacency(graph.blocks, n)
    ref = _explicit_adjacency(src, dst, n)
    x = np.random.default_rng(1).standard_normal((n, 3))
    assert adj.num_undirected_edges == ref.nnz // 2
    assert np.allclose(adj.matmat(x), ref @ x, rtol=1e-13, atol=1e-10)
    assert np.array_equal(adj.degrees(), np.asarray(ref.sum(1)).ravel())
    vals, vecs = block_laplacian_eigs(graph.blocks, n, 8)
    ref_vals, _ = laplacian_eigs(src, dst, n, 8)
    assert np.allclose(vals, ref_vals, atol=1e-9)
    resid, norm_err = _eig_quality(normalized_laplacian(src, dst, n), vals, vecs)
    assert resid < 1e-6 and norm_err < 1e-9


# ---- on-disk cache -----------------------------------------------------------------------------------------
@pytest.fixture
def lpe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NINO_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("NINO_FAST_LPE_CACHE", raising=False)
    monkeypatch.setattr(lpe_mod, "CACHE_MIN_NODES", 0)
    return tmp_path / "lpe"


def test_lpe_cache_roundtrip(lpe_cache, monkeypatch):
    g = load("gpt2")
    first = build_graph(g["named"], arch="gpt2", lpe=4, **g["kwargs"])
    files = list(lpe_cache.glob("*.npy"))
    assert len(files) == 1
    key = lpe_mod.cache_key(first.blocks, first.num_nodes, 4)
    assert files[0].name == f"{key}.npy"
    calls = []
    monkeypatch.setattr(lpe_mod, "block_laplacian_eigs", lambda *a: calls.append(a))  # must not be called
    second = build_graph(g["named"], arch="gpt2", lpe=4, **g["kwargs"])
    assert not calls and torch.equal(first.lpe, second.lpe)


def test_lpe_cache_key_and_opt_out(lpe_cache, monkeypatch):
    g = load("gpt2")
    graph = build_graph(g["named"], arch="gpt2", lpe=0, **g["kwargs"])
    keys = {lpe_mod.cache_key(graph.blocks, graph.num_nodes, k) for k in (4, 8)}
    keys.add(lpe_mod.cache_key(graph.blocks[:-1], graph.num_nodes, 4))
    assert len(keys) == 3  # k and structure change the key
    block_lpe(graph.blocks, graph.num_nodes, 4, cache=False)
    monkeypatch.setenv("NINO_FAST_LPE_CACHE", "0")
    block_lpe(graph.blocks, graph.num_nodes, 4)
    assert not lpe_cache.exists() or not list(lpe_cache.iterdir())


def test_lpe_cache_damaged_entry_is_recomputed(lpe_cache):
    g = load("llama")
    graph = build_graph(g["named"], arch="llama", lpe=0, **g["kwargs"])
    good = block_lpe(graph.blocks, graph.num_nodes, 8)
    path = lpe_cache / f"{lpe_mod.cache_key(graph.blocks, graph.num_nodes, 8)}.npy"
    path.write_bytes(b"not an array")
    assert torch.equal(block_lpe(graph.blocks, graph.num_nodes, 8), good)
    assert torch.equal(torch.from_numpy(np.load(path)), good)
