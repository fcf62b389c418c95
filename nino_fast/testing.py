"""Shared test helpers of nino_fast (as ``torch_scatter.testing`` / ``pyg_lib.testing``): random CSR graphs, random
inputs of the fused ops, argument lists in schema order, and per-dtype tolerances.

Used by tests/ (and usable by anyone checking an implementation of the ops against :mod:`nino_fast.ops.reference`).
Graphs are destination-sorted CSR as the ops expect: the edges into node n are ``rowptr[n]:rowptr[n+1]``.
"""

from __future__ import annotations

import os

import torch

from .ops import dispatch

__all__ = [
    "CASES",
    "INTERPRET",
    "call_op",
    "OPS",
    "check",
    "make_inputs",
    "run_op",
    "assert_close_scaled",
    "device_of",
    "grad_names",
    "op_args",
    "random_csr",
    "tiny_transformer",
    "random_inputs",
    "assert_meta_paths_agree",
    "assert_window_matches_nowcast",
    "tolerance",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OPS = ("film_mean", "edge_mlp", "edge_film_mean")

# (atol, rtol) of a result against the float64 reference, scaled by max(1, |reference|): float32 kernels sum in
# other orders than the reference; 16-bit inputs are rounded before any arithmetic.
_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for inputs of ``dtype`` compared with the float64 reference."""
    return _TOL[dtype]


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32, msg=None):
    """``got`` equals ``want`` to :func:`tolerance` ``(dtype)``, the absolute part scaled by max(1, |want|)."""
    atol, rtol = tolerance(dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.to(want.dtype), want, atol=atol * scale, rtol=rtol, msg=msg)


def device_of(backend: str) -> str:
    """The device a backend's tests run on: Triton under its interpreter runs on CPU tensors."""
    if backend == "triton" and INTERPRET:
        return "cpu"
    return "cuda" if backend in ("cuda", "triton") else "cpu"


def random_csr(
    n_nodes: int, n_edges: int, hub: int = 0, gen: torch.Generator | None = None, hub_node: int | None = None
):
    """Random destination-sorted CSR: ``n_edges`` edges between random nodes plus ``hub`` edges into node
    ``hub_node`` (default ``n_nodes // 2``: a huge-degree row); some rows stay empty. Returns ``(rowptr int64
    (N+1,), src int32 (E,), dst int32 (E,))``."""
    if n_nodes == 0:
        empty = torch.zeros(0, dtype=torch.int32)
        return torch.zeros(1, dtype=torch.int64), empty, empty
    hub_row = n_nodes // 2 if hub_node is None else hub_node
    dst = torch.cat((torch.randint(0, n_nodes, (n_edges,), generator=gen), torch.full((hub,), hub_row)))
    dst = dst.sort().values
    src = torch.randint(0, n_nodes, (dst.numel(),), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n_nodes + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n_nodes).cumsum(0)
    return rowptr, src, dst.to(torch.int32)


def random_inputs(
    n_nodes: int,
    n_edges: int,
    c: int = 3,
    d: int = 4,
    d_out: int | None = None,
    n_types: int = 3,
    hub: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    scale: float = 0.5,
    requires_grad: bool = False,
    weight_scale: float | None = None,
) -> dict:
    """Random tensors for every fused op on one :func:`random_csr` graph, under short names: ``feat`` (E, C),
    ``etype`` (E,), film_mean's ``W2`` (2D, C), ``b2``, ``T2`` (T, 2D); the edge MLP's ``Wa`` (D, C), ``ba``, ``Ta``
    (T, D), ``Wb`` (D', D), ``bb``; node terms ``nd``, ``ns`` (N, D), ``nd2``, ``ns2`` (N, D'), ``md``, ``ms`` (N, D);
    edge_film_mean's ``Wsc``, ``Wsh`` (D, D), ``bsc``, ``bsh``; edge_mlp's readout layers ``Wc`` (D, D'), ``bc``,
    ``Wd`` (3, D), ``bd``. Floats are N(0, scale^2) in ``dtype`` (the weight
    matrices N(0, weight_scale^2) if given)."""
    gen = torch.Generator().manual_seed(seed)
    rowptr, src, dst = random_csr(n_nodes, n_edges, hub, gen)
    e, d_out = src.numel(), d_out or d

    def r(*shape, std=scale):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)
        return t.requires_grad_(requires_grad)

    w = scale if weight_scale is None else weight_scale

    return dict(
        rowptr=rowptr,
        src=src,
        dst=dst,
        etype=torch.randint(0, n_types, (e,), generator=gen),
        feat=r(e, c),
        W2=r(2 * d, c, std=w),
        b2=r(2 * d),
        T2=r(n_types, 2 * d),
        Wa=r(d, c, std=w),
        ba=r(d),
        Ta=r(n_types, d),
        Wb=r(d_out, d, std=w),
        bb=r(d_out),
        Wsc=r(d, d, std=w),
        bsc=r(d),
        Wsh=r(d, d, std=w),
        bsh=r(d),
        nd=r(n_nodes, d),
        ns=r(n_nodes, d),
        nd2=r(n_nodes, d_out),
        ns2=r(n_nodes, d_out),
        md=r(n_nodes, d),
        ms=r(n_nodes, d),
        Wc=r(d, d_out, std=w),
        bc=r(d),
        Wd=r(3, d, std=w),
        bd=r(3),
    )


# Each op's schema arguments -> the short names of random_inputs (None: an optional input left out).
_NAMES = {
    "film_mean": tuple("feat rowptr src nd ns W2 b2 etype T2".split()),
    "edge_mlp": tuple("feat src dst Wa ba Wb bb etype Ta ns nd ns2 nd2".split()),
    "edge_film_mean": tuple("feat rowptr src Wa ba etype Ta ns nd md ms Wsc bsc Wsh bsh".split()),
}
_TABLE = {"etype", "T2", "Ta"}
_GATHERS = {"ns", "nd", "ns2", "nd2"}
_READOUT = ("Wc", "bc", "Wd", "bd")  # edge_mlp's arguments after act_out


def op_args(
    op: str, x: dict, table: bool = True, gathers: bool = True, act_out: bool = True, readout: bool = False
) -> tuple:
    """The positional arguments of ``torch.ops.nino_fast.<op>`` from :func:`random_inputs` ``x``, in schema order;
    without the per-type ``table`` (and etype), without edge_mlp's node ``gathers``; edge_mlp's ``act_out`` and its
    ``readout`` layers (``Wc``, ``bc``, ``Wd``, ``bd``)."""
    drop = (set() if table else _TABLE) | (_GATHERS if op == "edge_mlp" and not gathers else set())
    args = tuple(None if k in drop else x[k] for k in _NAMES[op])
    if op != "edge_mlp":
        return args
    return (*args, act_out, *(x[k] for k in _READOUT)) if readout else (*args, act_out)


def grad_names(op: str, table: bool = True, gathers: bool = True, act_out: bool = True, readout: bool = False):
    """The short names of ``op``'s differentiable inputs (floating point, present) under the options of
    :func:`op_args` (``act_out`` does not change them)."""
    drop = (set() if table else _TABLE) | (_GATHERS if op == "edge_mlp" and not gathers else set())
    names = [k for k in _NAMES[op] if k not in drop and k not in ("rowptr", "src", "dst", "etype")]
    return names + list(_READOUT) if op == "edge_mlp" and readout else names


def call_op(op: str, impl, x: dict, backend: str | None = None, table=True, gathers=True, act_out=True, readout=False):
    """``op`` through ``impl`` (:mod:`nino_fast.ops.dispatch` or :mod:`~nino_fast.ops.reference`) on ``x``."""
    kw = {} if impl.__name__.endswith("reference") else {"backend": backend}
    return getattr(impl, op)(*op_args(op, x, table, gathers, act_out, readout), **kw)


# (op, options of op_args) covering each op with and without its optional inputs
CASES = [
    ("film_mean", dict(table=True)),
    ("film_mean", dict(table=False)),
    ("edge_mlp", dict(table=True, gathers=True, act_out=True)),
    ("edge_mlp", dict(table=False, gathers=False, act_out=False)),
    ("edge_mlp", dict(table=True, gathers=True, act_out=False)),
    ("edge_mlp", dict(table=True, gathers=True, act_out=False, readout=True)),
    ("edge_mlp", dict(table=False, gathers=False, act_out=True, readout=True)),
    ("edge_film_mean", dict(table=True)),
    ("edge_film_mean", dict(table=False)),
]


def tiny_transformer(arch: str) -> torch.nn.Module:
    """A tiny transformers model from torch's current random state: ``'gpt2'`` (width 32, 2 layers, 4 heads) or
    ``'llama'`` (the same with 2 key/value heads: grouped-query attention); vocabulary 50."""
    import transformers as tf

    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    if arch != "llama":
        raise ValueError(f"tiny_transformer: arch must be 'gpt2' or 'llama', got {arch!r}")
    cfg = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    return tf.LlamaForCausalLM(cfg)


# ---------------------------------------------------------------- the kernel suites' inputs and runner
def make_inputs(n_nodes, n_edges, c, d, d_out=None, n_types=15, heavy=0, seed=0, dtype=torch.float32, noncontig=False):
    gen = torch.Generator().manual_seed(seed)
    rowptr, src, dst = random_csr(n_nodes, n_edges, heavy, gen, hub_node=0)
    e = rowptr[-1].item()

    def r(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5
        if noncontig and len(shape) == 2:
            t = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64).t() * 0.5
        return t.to(dtype)

    """The kernel suites' inputs (tests/test_kernels.py and the per-device suites): like :func:`random_inputs`
    under the keys ``table2`` / ``table`` for the type tables, node 0 the hub of ``heavy`` extra in-edges."""
    return dict(
        rowptr=rowptr,
        src=src,
        dst=dst,
        feat=r(e, c),
        etype=torch.randint(0, n_types, (e,), generator=gen),
        table2=r(n_types, 2 * d),
        table=r(n_types, d),
        nd=r(n_nodes, d),
        ns=r(n_nodes, d),
        nd2=r(n_nodes, d_out or d),
        ns2=r(n_nodes, d_out or d),
        W2=r(2 * d, c),
        b2=r(2 * d),
        Wa=r(d, c),
        ba=r(d),
        Wb=r(d_out or d, d),
        bb=r(d_out or d),
        Wsc=r(d, d),
        bsc=r(d),
        Wsh=r(d, d),
        bsh=r(d),
        md=r(n_nodes, d),
        ms=r(n_nodes, d),
    )


def _to(x, device, dtype=None):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(device=device, dtype=dtype or x.dtype)
    return x.to(device) if isinstance(x, torch.Tensor) else x


def run_op(op, inp, backend, dtype=None, use_table=True):
    """``op`` on :func:`make_inputs` ``inp`` through :mod:`nino_fast.ops.dispatch` on ``backend``, as float64 on
    the CPU. ``edge_mlp_plain``: edge_mlp without its optional inputs and SiLU."""
    dev = "cpu" if backend == "reference" else device_of(backend)
    a = {k: _to(v, dev, dtype) for k, v in inp.items()}
    a["T2"], a["Ta"] = a["table2"], a["table"]  # make_inputs' names of the type tables
    plain = op == "edge_mlp_plain"
    name = "edge_mlp" if plain else op
    args = op_args(name, a, table=use_table and not plain, gathers=not plain, act_out=not plain)
    out = getattr(dispatch, name)(*args, backend=backend)
    return out.double().cpu()


def check(op, inp, backend, use_table=True, atol=1e-5):
    want = run_op(
        op,
        {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()},
        "reference",
        use_table=use_table,
    )
    got = run_op(op, inp, backend, use_table=use_table)
    assert got.shape == want.shape
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=1e-5)


def assert_meta_paths_agree(model, batch) -> dict[str, torch.Tensor]:
    """Meta-training's fused paths (``folded``, ``layerwise``) against the ``oracle`` on one batch: the loss, and
    the gradient of every parameter that gets one (the same parameters on every path). Returns the oracle's
    gradients by parameter name."""
    import pytest

    from .meta.forward import PATHS, loss_fn, predict_pieces

    losses, grads = {}, {}
    for path in PATHS:
        model.zero_grad()
        loss = loss_fn(predict_pieces(model, batch, path), batch)
        loss.backward()
        losses[path] = loss.item()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for path in ("folded", "layerwise"):
        assert losses[path] == pytest.approx(losses["oracle"], rel=1e-5)
        assert grads[path].keys() == grads["oracle"].keys()
        for n, r in grads["oracle"].items():
            torch.testing.assert_close(grads[path][n], r, atol=1e-5 * max(1.0, r.abs().max().item()), rtol=1e-4)
    return grads["oracle"]


def assert_window_matches_nowcast(model, sampler, run: str, graph, horizons=(1, 7, 40)) -> None:
    """The first window of a trajectory of ``run`` through meta-training's forward (``folded``) equals
    :meth:`NiNoModel.nowcast` on ``graph`` (the run's model) at each horizon (nowcast rescales its input, which is
    already scaled: mean 0, std 1 per tensor up to rounding)."""
    from .meta.data import make_batch
    from .meta.forward import predict

    info, _, x, _ = sampler.trajectory(run)[0]
    K = model.seq_len
    one = make_batch([(info, torch.ones(1, info.graph.lpe.shape[1]), x, torch.zeros(x.shape[0], K))], model.ctx, K)
    with torch.no_grad():
        delta = predict(model, one, "folded")
    for k in horizons:
        torch.testing.assert_close(x[:, -1] + delta[:, k - 1], model.nowcast(graph, x, k), atol=2e-4, rtol=2e-4)
