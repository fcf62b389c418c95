"""Sharded inference over torch.distributed (gloo, 2 processes on this machine): identical to one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nino_fast import NiNoModel, build_graph
from nino_fast.distributed import edge_features, nowcast_sharded, shard_bounds

sys.path.insert(0, str(Path(__file__).parent))
from golden import load  # noqa: E402

CASES = ("llama", "convnet", "mlp_wnn")


def _worker(rank, world, init_file, out_dir, case, die_rank):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=__import__("datetime").timedelta(seconds=20),
    )
    try:
        g = load(case)
        graph = build_graph(g["named"], arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
        model = NiNoModel.from_checkpoint(g["ckpt_path"])
        states = torch.from_numpy(g["states"])
        if rank == die_rank:
            os._exit(3)  # a process that dies before the step
        stats = {}
        try:
            out = nowcast_sharded(model, graph, states, int(g["k"]), stats=stats)
            torch.save({"out": out, "stats": stats}, Path(out_dir) / f"{rank}.pt")
        except Exception as exc:
            torch.save({"error": f"{type(exc).__name__}: {exc}"}, Path(out_dir) / f"{rank}.pt")
    finally:
        if die_rank < 0:
            dist.destroy_process_group()


def _spawn(tmp_path, case, world=2, die_rank=-1):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, tmp_path / "init", tmp_path, case, die_rank)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
            pytest.fail("a process hung")
    return {r: torch.load(tmp_path / f"{r}.pt") for r in range(world) if (tmp_path / f"{r}.pt").exists()}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_identical_to_one(tmp_path, case):
    g = load(case)
    graph = build_graph(g["named"], arch=g["arch"], lpe=g["lpe_t"], **g["kwargs"])
    model = NiNoModel.from_checkpoint(g["ckpt_path"])
    single = model.nowcast(graph, torch.from_numpy(g["states"]), int(g["k"]))
    res = _spawn(tmp_path, case)
    assert set(res) == {0, 1}
    for r in (0, 1):
        assert "error" not in res[r], res[r]
        out = res[r]["out"]
        assert (out - single).abs().max() <= 1e-6 * single.abs().max()
    assert torch.equal(res[0]["out"], res[1]["out"])  # every rank ends with the same parameters
    if case != "mlp_wnn":
        assert res[0]["stats"]["shard_edges"] + res[1]["stats"]["shard_edges"] == graph.num_edges
        # communication: two (N, D) aggregations and the (P,) prediction, plus the input check
        expected = 2 * graph.num_nodes * 128 * 4 + graph.num_params * 4
        assert expected <= res[0]["stats"]["allreduce_bytes"] <= expected + 1024


def test_dead_peer_gives_clear_error(tmp_path):
    res = _spawn(tmp_path, "llama", die_rank=1)
    assert 1 not in res and "error" in res[0]
    assert "no parameters were changed" in res[0]["error"] or "peers unreachable" in res[0]["error"]


def test_shards_cover_graph_and_edge_features_match():
    g = load("convnet")
    graph = build_graph(g["named"], lpe=0)
    scaled = torch.randn(graph.num_params, 5)
    full = graph.to_edges(scaled)
    for world in (1, 2, 3, 7):
        bounds = shard_bounds(graph, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == graph.num_nodes and bounds[-1][3] == graph.num_edges
        for (_n0, n1, e0, e1), nxt in zip(bounds, bounds[1:] + [None], strict=True):
            assert torch.equal(edge_features(graph, scaled, e0, e1), full[e0:e1])
            if nxt:
                assert (n1, e1) == (nxt[0], nxt[2])


def test_requires_initialised_group():
    g = load("mlp")
    graph = build_graph(g["named"], lpe=8)
    with pytest.raises(RuntimeError, match="not initialised"):
        nowcast_sharded(NiNoModel(wte_pos_enc=False), graph, torch.zeros(graph.num_params, 5), 1)
