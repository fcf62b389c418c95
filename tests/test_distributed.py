"""Sharded inference over torch.distributed (gloo, 2 processes on this machine): identical to one process for every
golden architecture and for tiny transformers GPT-2 / Llama models stepped the way the NiNo wrapper steps them;
inputs (the LPE included), failures and communication agreed by all processes."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nino_fast import NiNoModel, build_graph, plan, stream
from nino_fast._env import torch_threads
from nino_fast.distributed import build_graph_shard, nowcast_sharded, param_shard, shard_bounds, shard_graph
from nino_fast.graph import assemble
from nino_fast.scaling import scale_stats_of_columns
from nino_fast.testing import tiny_transformer

sys.path.insert(0, str(Path(__file__).parent))
from golden import CASES, ckpt, load  # noqa: E402

WORLD = 2
THREADS = 1  # torch threads of each worker and of the one-process reference
BLAS_THREADS = 1  # and BLAS threads (torchrun sets OMP_NUM_THREADS=1): a computed LPE depends on them
GOLDEN_ARCHS = ("mlp", "gpt2", "gpt2_posw", "qwen3", "bert", "vit", "nanogpt")  # (llama, convnet: below)
HF = ("hf-gpt2", "hf-llama")  # tiny transformers models, their graphs built by each process with a computed LPE
# (name, golden case, states: full history or each rank's own rows ("-shard": each rank given only its part of
# the graph, shard_graph, and not the whole), scale method override, fault injected)
JOBS = [
    ("llama", "llama", "full", None, None),
    ("convnet", "convnet", "full", None, None),
    ("mlp_wnn", "mlp_wnn", "full", None, None),
    ("llama-local", "llama", "local", None, None),
    ("convnet-local", "convnet", "local", None, None),
    ("llama-local-shard", "llama", "local-shard", None, None),
    ("convnet-full-shard", "convnet", "full-shard", None, None),
    ("convnet-local-shard-min-max", "convnet", "local-shard", "min-max", None),
    ("llama-local-shard-tiles", "llama", "local-shard", None, "tiles"),  # many row tiles per rank: still exact
    *[
        (f"llama-{m}-{mode}", "llama", mode, m, None)
        for m in ("std-param", "min-max", "min-max-param")
        for mode in ("full", "local")
    ],
    ("nan-on-rank-1", "llama", "full", None, "nan"),
    ("states-differ", "llama", "full", None, "differ"),
    ("raises-on-rank-1", "convnet", "full", None, "raise"),
    ("wrong-shard-on-rank-1", "llama", "local-shard", None, "wrong-shard"),
    ("wnn-given-a-shard", "mlp_wnn", "full-shard", None, None),
    ("max-memory-too-small", "llama", "local-shard", None, "1KB"),
    # own rows with the full history's statistics given (a DDP process's case): bitwise one process
    *[(f"llama-local-scales-{m}", "llama", "local-shard", m, "scales") for m in ("std", "min-max", "min-max-param")],
    ("scales-on-rank-1-only", "llama", "local", None, "scales-1"),
    # every other golden architecture: full history, and own rows with the full history's statistics
    *[(case, case, "full", None, None) for case in GOLDEN_ARCHS],
    *[(f"{case}-local-scales", case, "local-shard", None, "scales") for case in GOLDEN_ARCHS],
    # the NiNo wrapper's path (build_graph_shard with a computed LPE; own rows and statistics from a (ctx, n_params)
    # snapshot buffer), the full history, and rank 1's LPE in another eigenvector basis (rank 0's is used)
    *[(f"{case}-{mode}", case, mode, None, None) for case in HF for mode in ("wrapper", "wrapper-full")],
    *[(f"{case}-lpe-differs", case, "wrapper", None, "lpe") for case in HF],
    ("after-the-failure", "convnet", "full", None, None),  # the group is still in step
]


def _inputs(case: str, method: str | None):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
    model = NiNoModel.from_checkpoint(g["ckpt_path"])
    if method is not None:
        model.scale_method = method
    return graph, model, torch.from_numpy(g["states"]), int(g["k"])


@functools.cache
def _hf(case: str):
    """(named shapes, graph kwargs, (ctx, n_params) snapshot buffer, k) of a tiny transformers model: its parameters
    plus a random walk, stored the way the wrapper stores snapshots (row-major per snapshot)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if case == "hf-gpt2":
            model, kwargs = tiny_transformer("gpt2"), dict(arch="gpt2", num_heads=4)
        else:
            model, kwargs = tiny_transformer("llama"), dict(arch="llama", num_heads=4, num_key_value_heads=2)
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        walk = (1e-3 * torch.randn(5, flat.numel())).cumsum(0)
    return named, kwargs, (flat + walk).contiguous(), 10


def _blas(threads: int):
    """A context limiting the BLAS threads (LAPACK's eigensolver gives the LPE)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads)


def _wrapper_inputs(hf, mode, fault, rank, world):
    """What ``NiNo(distributed=True)`` gives ``nowcast_sharded`` on this rank from the model ``hf`` (:func:`_hf`):
    the part built with ``build_graph_shard`` (the LPE solved here), and its own rows copied from the snapshot
    buffer with the full snapshots' statistics (``wrapper``) -- or the full history (``wrapper-full``)."""
    named, kwargs, snapshots, k = hf
    model = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
    with _blas(BLAS_THREADS):
        graph = build_graph_shard(named, rank, world, lpe=int(model.lpe), **kwargs)
    if fault == "lpe" and rank == 1:  # another basis of the same eigenvectors: a column's sign flipped
        lpe = graph.local.lpe.clone()
        lpe[:, 0].neg_()
        graph = dataclasses.replace(graph, local=dataclasses.replace(graph.local, lpe=lpe))
    C = snapshots.shape[0]
    if mode == "wrapper-full":
        return graph, model, torch.empty(graph.num_params, C).copy_(snapshots.t()), k, None
    ids = graph.shard.ids.long()
    own = torch.empty(ids.numel(), C).copy_(snapshots.t().index_select(0, ids))
    scales = scale_stats_of_columns(snapshots, graph.param_shapes, model.scale_method, dtype=torch.float32)
    return graph, model, own, k, scales


def _golden_inputs(case, mode, method, fault, rank, world):
    graph, model, states, k = _inputs(case, method)
    shard = param_shard(graph, rank, world)
    given = None
    if fault in ("scales", "scales-1") and (fault == "scales" or rank == 1):
        given = scale_stats_of_columns(states.t(), graph.param_shapes, model.scale_method)
    if mode.startswith("local"):
        states = states[shard.ids.long()]
    if mode.endswith("-shard"):  # this rank's part of the graph only: the whole is freed
        graph = shard_graph(graph, 0 if fault == "wrong-shard" and rank == 1 else rank, world)
    return graph, model, states, k, given


def _worker(rank, world, init_file, out_dir, jobs, die_rank):
    torch.set_num_threads(THREADS)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    results = {}
    hf = torch.load(Path(out_dir) / "hf.pt") if any(job[1] in HF for job in jobs) else {}  # (see runs)
    for name, case, mode, method, fault in jobs:
        if case in HF:
            graph, model, states, k, given = _wrapper_inputs(hf[case], mode, fault, rank, world)
        else:
            graph, model, states, k, given = _golden_inputs(case, mode, method, fault, rank, world)
        if rank == 1 and fault == "nan":
            states = states.clone()
            states[-1, 0] = float("nan")
        if rank == 1 and fault == "differ":
            states = states + 1e-3
        original = plan.film_rows
        if rank == 1 and fault == "raise":

            def broken(*args, **kwargs):
                raise RuntimeError("injected failure")

            plan.film_rows = broken
        tiles = stream.row_tiles
        if fault == "tiles":  # tiles of ~50 edges (a row longer than that is a tile of its own)
            stream.row_tiles = lambda g, max_edges, *rows, _tiles=tiles: _tiles(g, 50, *rows)
        if rank == die_rank:
            os._exit(3)  # a process that dies before the step
        stats = {}
        try:
            memory = fault if fault and fault.endswith("KB") else None
            out = nowcast_sharded(model, graph, states, k, stats=stats, max_memory=memory, scales=given)
            results[name] = {"out": out, "stats": stats}
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        plan.film_rows, stream.row_tiles = original, tiles
    torch.save(results, Path(out_dir) / f"{rank}.pt")
    if die_rank < 0:
        dist.destroy_process_group()


def _spawn(tmp_path, jobs, die_rank=-1):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, WORLD, tmp_path / "init", tmp_path, jobs, die_rank)) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
            pytest.fail("a process hung")
    return {r: torch.load(tmp_path / f"{r}.pt") for r in range(WORLD) if (tmp_path / f"{r}.pt").exists()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All jobs, one after the other in the same two processes (one start-up for the whole module). The
    transformers models are made here and saved for the workers (which then need not import transformers)."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.save({case: _hf(case) for case in HF}, tmp / "hf.pt")
    res = _spawn(tmp, JOBS)
    assert set(res) == {0, 1}
    return res


def _single(name):
    """One process's result, with the workers' thread count: WNN+ runs torch's GEMMs, whose results may depend on
    it on some CPUs (MKL on an Intel Xeon: 2e-8 between 1 and 2 threads); our kernels' do not."""
    _, case, _, method, _ = next(j for j in JOBS if j[0] == name)
    if case in HF:  # the wrapper's one-process step: the whole graph, its LPE solved with the workers' BLAS threads
        named, kwargs, snapshots, k = _hf(case)
        model = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
        with _blas(BLAS_THREADS):
            graph = build_graph(named, lpe=int(model.lpe), **kwargs)
        states = torch.empty(graph.num_params, snapshots.shape[0]).copy_(snapshots.t())
    else:
        graph, model, states, k = _inputs(case, method)
    with torch_threads(THREADS):
        return graph, model.nowcast(graph, states, k)


def _exact(mode, method, fault) -> bool:
    """Whether two processes must give one process's result bit for bit: always, except given own rows and no
    statistics with ``std`` (mean and std then come from float64 sums of the parts, not from torch's float32
    reductions over each whole tensor: they may round differently, ~1e-7 relative)."""
    return not (mode.startswith("local") and fault != "scales" and method in (None, "std"))


@pytest.mark.parametrize(
    "name", [j[0] for j in JOBS if j[4] in (None, "tiles", "scales") and j[0] != "wnn-given-a-shard"]
)
def test_two_processes_identical_to_one(runs, name):
    graph, single = _single(name)
    _, _, mode, method, fault = next(j for j in JOBS if j[0] == name)
    for r in (0, 1):
        assert "error" not in runs[r][name], runs[r][name]
        out = runs[r][name]["out"]
        if _exact(mode, method, fault):
            assert torch.equal(out, single), (out - single).abs().max()
        else:
            assert (out - single).abs().max() <= 1e-6 * single.abs().max()
    assert torch.equal(runs[0][name]["out"], runs[1][name]["out"])  # every rank ends with the same parameters


@pytest.mark.parametrize("case", HF)
def test_processes_with_different_lpes_use_rank_0s(runs, case):
    """Each process solves for its LPE, whose basis in repeated eigenvalues depends on the BLAS threads: given
    different LPEs (rank 1's with a column's sign flipped), both use rank 0's (one broadcast) and give one process's
    step with it, bit for bit -- not a mix of two steps."""
    name = f"{case}-lpe-differs"
    graph, single = _single(name)
    for r in (0, 1):
        assert "error" not in runs[r][name], runs[r][name]
        assert torch.equal(runs[r][name]["out"], single)
        log = dict(runs[r][name]["stats"]["allreduce_log"])
        assert log["the LPE"] == graph.lpe.numel() * 4
        assert "the LPE" not in dict(runs[r][f"{case}-wrapper"]["stats"]["allreduce_log"])  # equal LPEs: none
    flipped = graph.lpe.clone()
    flipped[:, 0].neg_()
    model = NiNoModel.from_checkpoint(ckpt("nino_no_posw.pt"))
    _, _, snapshots, k = _hf(case)
    states = torch.empty(graph.num_params, snapshots.shape[0]).copy_(snapshots.t())
    with torch_threads(THREADS):
        other = model.nowcast(dataclasses.replace(graph, lpe=flipped), states, k)
    assert not torch.equal(other, single)  # (the LPE matters: a mix of both would be neither)


@pytest.mark.parametrize("name", ["llama", "convnet", "llama-local", "llama-local-shard"])
def test_shards_and_communication(runs, name):
    graph, _ = _single(name)
    s0, s1 = runs[0][name]["stats"], runs[1][name]["stats"]
    assert s0["shard_edges"] + s1["shard_edges"] == graph.num_edges
    assert s0["shard_params"] + s1["shard_params"] == graph.num_params
    # one (N, D) aggregation per message pass, the (P + world,) prediction, and small ones: the input check
    # (2 x 13 float64: 11 values and the LPE's 64-bit hash) and, with each rank's own rows, the per-tensor scaling
    # sums (2 x T float64); no LPE broadcast (the ranks' LPEs are the same)
    log = dict(s0["allreduce_log"])
    assert log["message pass 1"] == log["message pass 2"] == graph.num_nodes * 128 * 4
    assert log["the prediction"] == (graph.num_params + WORLD) * 4
    small = 2 * 13 * 8 + (2 * len(graph.param_shapes) * 8 if "local" in name else 0)
    assert s0["allreduce_bytes"] == 2 * graph.num_nodes * 128 * 4 + (graph.num_params + WORLD) * 4 + small


def test_failures_are_agreed(runs):
    # invalid inputs on rank 1 only: both raise ValueError before any work
    assert "ValueError" in runs[1]["nan-on-rank-1"]["error"] and "NaN" in runs[1]["nan-on-rank-1"]["error"]
    assert "another process was given invalid inputs" in runs[0]["nan-on-rank-1"]["error"]
    for r in (0, 1):
        assert "different states" in runs[r]["states-differ"]["error"]
        # an exception in rank 1's message pass: rank 1 still joins the collectives, both raise naming rank 1
        err = runs[r]["raises-on-rank-1"]["error"]
        assert err.startswith("RuntimeError") and "failed on rank(s) [1]" in err and "no parameters" in err
    assert "injected failure" in runs[1]["raises-on-rank-1"]["error"]
    # a rank given another rank's part of the graph; a model that runs whole given parts only
    assert (
        "ValueError" in runs[1]["wrong-shard-on-rank-1"]["error"]
        and "rank 0's of 2" in runs[1]["wrong-shard-on-rank-1"]["error"]
    )
    assert "another process was given invalid inputs" in runs[0]["wrong-shard-on-rank-1"]["error"]
    for r in (0, 1):
        assert "runs whole on one process" in runs[r]["wnn-given-a-shard"]["error"]
        # each rank's streamed step checks its max_memory: both fail, naming both ranks
        err = runs[r]["max-memory-too-small"]["error"]
        assert "failed on rank(s) [0, 1]" in err and "max_memory=1000 bytes is too small" in err
        # statistics given on one rank only: its collectives would not match the other's; agreed, no hang
        assert "different states, k or graphs" in runs[r]["scales-on-rank-1-only"]["error"]


def test_dead_peer_gives_clear_error(tmp_path):
    res = _spawn(tmp_path, JOBS[:1], die_rank=1)
    assert 1 not in res and "error" in res[0]["llama"]
    assert "CommError" in res[0]["llama"]["error"] and "no parameters were changed" in res[0]["llama"]["error"]


@pytest.mark.parametrize("method", ["std", "std-param", "min-max-param"])
def test_graph_shards_cover_graph_and_their_features_match(method):
    g = load("convnet")
    graph = build_graph(g["named"], lpe=0)
    states = torch.randn(graph.num_params, 5)
    cpu = torch.device("cpu")
    whole = stream.History(graph, states, method, cpu)
    features = whole.features(0, graph.num_edges)  # scaled history on every edge slot, constants included
    F = graph.max_feat_size
    for world in (1, 2, 3, 7):
        bounds = shard_bounds(graph, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == graph.num_nodes and bounds[-1][3] == graph.num_edges
        owned = torch.zeros(graph.num_params, dtype=torch.int64)
        for rank, ((n0, n1, e0, e1), nxt) in enumerate(zip(bounds, bounds[1:] + [None], strict=True)):
            if nxt:
                assert (n1, e1) == (nxt[0], nxt[2])
            sh = param_shard(graph, rank, world)
            ids = sh.ids.long()
            owned[ids] += 1
            assert torch.equal(graph.param_pos[ids], sh.pos.long() + e0 * F)
            assert sh.seg[0] == 0 and sh.seg[-1] == ids.numel() and list(sh.seg) == sorted(sh.seg)
            # the part of the graph: all nodes, this shard's rows' edges only, renumbered from 0
            gs = shard_graph(graph, rank, world)
            local = gs.local
            assert (gs.num_nodes, gs.num_edges, gs.num_params) == (graph.num_nodes, graph.num_edges, graph.num_params)
            assert local.num_nodes == graph.num_nodes and local.num_edges == e1 - e0 and local.num_params == ids.numel()
            deg = graph.degree()
            deg[:n0], deg[n1:] = 0, 0
            assert torch.equal(local.degree(), deg) and int(local.rowptr[n0]) == 0
            for name in ("src", "dst", "edge_type_u8"):
                assert torch.equal(getattr(local, name), getattr(graph, name)[e0:e1])
            assert gs.whole is None and shard_graph(graph, rank, world, copy=False).whole is graph
            # its features from this shard's rows (with the whole graph's scales), or from the full history
            rows = torch.tensor(sh.seg[1:])
            scales = whole.scales if method == "std" else whole.scales[ids]  # per tensor, or per row of states[ids]
            mine = stream.History(local, states[ids], method, cpu, scales=scales, ends=rows)
            assert torch.equal(mine.features(0, e1 - e0), features[e0:e1])
            full = stream.History(local, states, method, cpu, rows=ids, scales=whole.scales)
            assert torch.equal(full.features(0, e1 - e0), features[e0:e1])
            assert torch.equal(full.used_edges(0, e1 - e0), whole.used_edges(e0, e1))
        assert torch.equal(owned, torch.ones_like(owned))  # every parameter on exactly one process


def _same_shard(a, b) -> None:
    for name in ("rowptr", "src", "dst", "edge_type_u8", "param_pos", "pos_w"):
        assert torch.equal(getattr(a.local, name), getattr(b.local, name)), name
    assert (a.local.lpe is None) == (b.local.lpe is None)
    assert a.local.lpe is None or torch.equal(a.local.lpe, b.local.lpe)
    assert torch.equal(a.shard.ids, b.shard.ids) and torch.equal(a.shard.pos, b.shard.pos)
    assert a.shard.seg == b.shard.seg
    assert (a.shard.node_lo, a.shard.node_hi, a.shard.edge_lo, a.shard.edge_hi) == (
        b.shard.node_lo,
        b.shard.node_hi,
        b.shard.edge_lo,
        b.shard.edge_hi,
    )
    assert (a.num_nodes, a.num_edges, a.num_params) == (b.num_nodes, b.num_edges, b.num_params)
    assert a.local.max_feat_size == b.local.max_feat_size and a.local.param_shapes == b.local.param_shapes


@pytest.mark.parametrize("case", CASES)
def test_build_graph_shard_equals_shard_of_whole_graph(case, monkeypatch):
    """Each process's part assembled straight from the layout equals the whole graph's part, for every golden
    architecture, 1..7 processes, and with tiny assembly chunks (chunk edges inside restricted row ranges)."""
    g = load(case)
    kwargs = dict(arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
    graph = build_graph(g["named"], **kwargs)
    for chunk in (assemble.CHUNK, 7):
        monkeypatch.setattr(assemble, "CHUNK", chunk)
        for world in (1, 2, 3, 7):
            for rank in range(world):
                _same_shard(build_graph_shard(g["named"], rank, world, **kwargs), shard_graph(graph, rank, world))
    with pytest.raises(ValueError, match="rank must be in"):
        build_graph_shard(g["named"], 2, 2, **kwargs)


def test_requires_initialised_group():
    g = load("mlp")
    graph = build_graph(g["named"], lpe=8)
    with pytest.raises(RuntimeError, match="not initialised"):
        nowcast_sharded(NiNoModel(wte_pos_enc=False), graph, torch.zeros(graph.num_params, 5), 1)


def test_default_memory_is_shared_by_the_processes_of_a_machine(monkeypatch):
    from nino_fast.distributed import _local_processes

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this machine
    assert _local_processes(8) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _local_processes(3) == 3  # not under torchrun: all of the group's processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    assert _local_processes(2) == 2


@pytest.mark.parametrize("method", ["std", "min-max", "min-max-param"])
@pytest.mark.parametrize("shapes", [[("w", (5, 6)), ("b", (5,))], []])
def test_scale_stats_of_columns_stay_on_the_columns_device(method, shapes):
    # the "meta" device stands in for a GPU: every branch, the no-parameter one included, allocates beside columns
    P = sum(math.prod(s) for _, s in shapes) or 1
    out = scale_stats_of_columns(torch.empty(5, P, device="meta"), shapes, method)
    assert out.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_process_group_any_dtype_equals_nowcast(tmp_path, dtype):
    """A group of one: nowcast_sharded is nowcast bit for bit, in the states' dtype, and leaves states as they were
    (a float64 history was once taken in place by the input check: every prediction wrong)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        graph, model, states, k = _inputs("mlp", None)
        states = states.to(dtype)
        kept = states.clone()
        got = nowcast_sharded(model, graph, states, k)
        assert torch.equal(states, kept)
        assert got.dtype == dtype and torch.equal(got, model.nowcast(graph, states, k))
    finally:
        dist.destroy_process_group()
