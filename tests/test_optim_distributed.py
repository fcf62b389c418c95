"""``NiNo(distributed=True)`` in DDP training, 2 gloo processes: the same parameters everywhere, equal to one
process's NiNo step; failures (a NaN or an exception on one rank, a dead or silent rank) agreed by all ranks, never
a hang, never a partial update."""

from __future__ import annotations

import copy
import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nino_fast import plan
from nino_fast.optim import NiNo
from nino_fast.testing import tiny_transformer

from golden import ckpt

PERIOD = 10  # a NiNo step every 10 calls (snapshots every 2)
TIMEOUT = 5  # seconds: dist_timeout of the wrapper's process group


def mlp():
    torch.manual_seed(0)  # the same initial model on every rank, as DDP requires
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train(opt, ddp, x, y, calls):
    for _ in range(calls):
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()  # DDP's backward all-reduces gradients: every rank runs it
        opt.step()


def _to_nino(opt, ddp, x, y):
    """Base steps until the next call is a NiNo step."""
    while not opt.next_step_nino:
        _train(opt, ddp, x, y, 1)


def _nino(opt):
    """The NiNo step (no gradients needed); its exception, if any."""
    assert opt.next_step_nino
    try:
        opt.step()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _worker(rank, world, init_file, out_dir, scenario, ckpt_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    out = {}
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        base = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        opt = NiNo(
            base, ddp, ckpt=str(ckpt_path), period=PERIOD, max_train_steps=100, distributed=True, dist_timeout=TIMEOUT
        )
        _to_nino(opt, ddp, x, y)
        out["graph"] = (type(opt.graph).__name__, opt.graph.local.num_edges, opt.graph.num_edges)
        if scenario == "train":
            # 1. a NiNo step; what one process needs to redo it
            out["before"], out["state"] = flat(model), copy.deepcopy(opt.state_dict())
            out["model"] = copy.deepcopy(model.state_dict())
            out["error1"] = _nino(opt)
            out["after1"] = flat(model)
            # 2. a NaN in rank 1's prediction only: skipped on both ranks
            _to_nino(opt, ddp, x, y)
            out["before2"] = flat(model)
            bias = opt.predictor.edge_out.fc[-1].bias
            saved = bias.clone()
            if rank == 1:
                with torch.no_grad():
                    bias.fill_(float("nan"))
            out["error2"] = _nino(opt)
            out["after2"], out["snapshots2"] = flat(model), opt.num_snapshots
            with torch.no_grad():
                bias.copy_(saved)
            # 3. an exception on rank 1 between the two message passes, with on_error='raise': both raise, the
            #    group stays in step (rank 1 joins the rest with zeros) and the retried step succeeds
            _to_nino(opt, ddp, x, y)
            opt.on_error = "raise"
            out["before3"] = flat(model)
            original = plan.edge_film_rows
            if rank == 1:

                def broken(*args, **kwargs):
                    raise RuntimeError("injected failure")

                plan.edge_film_rows = broken
            out["error3"] = _nino(opt)
            out["after3"], out["snapshots3"] = flat(model), opt.num_snapshots
            plan.edge_film_rows = original
            out["error3b"] = _nino(opt)
            out["after3b"] = flat(model)
            _train(opt, ddp, x, y, 3)  # DDP goes on
            out["final"] = flat(model)
            # 4. rank 1 silent for longer than the timeout in the middle of the step: both skip it, none hangs
            _to_nino(opt, ddp, x, y)
            opt.on_error = "skip"
            out["silent"] = _stopped(opt, model, rank, lambda: time.sleep(TIMEOUT + 2))
        elif scenario == "unsynced":  # rank 1's parameters drift from rank 0's (no DDP sync of parameters)
            _train(opt, ddp, x, y, 1)  # the window's first snapshot is taken at the next call
            if rank == 1:
                with torch.no_grad():
                    model[0].weight[0, 0] += 1e-3
            _to_nino(opt, ddp, x, y)
            out["before"] = flat(model)
            out["error"] = _nino(opt)
            out["after"], out["snapshots"] = flat(model), opt.num_snapshots
        else:  # rank 1 dies in the middle of the NiNo step; rank 0 must neither hang nor change anything
            out["dead"] = _stopped(opt, model, rank, lambda: os._exit(3))
    except Exception as exc:
        out["crash"] = f"{type(exc).__name__}: {exc}"
    torch.save(out, Path(out_dir) / f"{rank}.pt")
    os._exit(0)  # the NiNo group has a dead or late peer: do not wait for it at exit


def _stopped(opt, model, rank, stop) -> dict:
    """A NiNo step during which rank 1 runs ``stop`` before its second message pass."""
    out = {"before": flat(model)}
    original = plan.edge_film_rows
    if rank == 1:

        def stopped(*args, **kwargs):
            stop()
            return original(*args, **kwargs)

        plan.edge_film_rows = stopped
    t0 = time.perf_counter()
    out["error"] = _nino(opt)
    out["seconds"] = time.perf_counter() - t0
    out["after"], out["snapshots"], out["broken"] = flat(model), opt.num_snapshots, opt._dist_broken
    plan.edge_film_rows = original
    return out


def _spawn(tmp_path, scenario, world=2, limit=120):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, tmp_path / "init", tmp_path, scenario, ckpt("nino_no_posw.pt")))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for r, p in enumerate(procs):
        if r == 0 or scenario == "train":
            p.join(max(1, deadline - time.monotonic()))
            if p.is_alive():
                for q in procs:
                    q.kill()
                pytest.fail(f"rank {r} hung")
        p.join(5 if p.is_alive() else None)  # a dead rank 1 has exited
    return {r: torch.load(tmp_path / f"{r}.pt") for r in range(world) if (tmp_path / f"{r}.pt").exists()}


def test_ddp_nino_steps_agree_and_match_one_process(tmp_path):
    res = _spawn(tmp_path, "train")
    assert set(res) == {0, 1}
    r0, r1 = res[0], res[1]
    assert "crash" not in r0 and "crash" not in r1, (r0.get("crash"), r1.get("crash"))
    # 0. each rank built only its part of the neural graph
    assert r0["graph"][0] == r1["graph"][0] == "GraphPart"  # this process's part only
    assert r0["graph"][1] + r1["graph"][1] == r0["graph"][2] and 0 < r0["graph"][1] < r0["graph"][2]
    # 1. the step changed the parameters, identically on both ranks, as one process's NiNo step does
    assert r0["error1"] is None and r1["error1"] is None
    assert torch.equal(r0["before"], r1["before"]) and torch.equal(r0["after1"], r1["after1"])
    assert not torch.equal(r0["after1"], r0["before"])
    model = mlp()
    model.load_state_dict(r0["model"])
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = NiNo(base, model, ckpt=str(ckpt("nino_no_posw.pt")), period=PERIOD, max_train_steps=100)
    opt.load_state_dict(r0["state"])
    assert opt.next_step_nino
    opt.step()
    one = flat(model)
    assert torch.equal(one, r0["after1"])  # bit for bit (within 1e-6 would do)
    # 2. NaN on rank 1 only: skipped on both, nothing written, snapshots dropped on both
    for r in (r0, r1):
        assert r["error2"] is None and torch.equal(r["after2"], r["before2"]) and r["snapshots2"] == 0
    # 3. an exception on rank 1 with on_error='raise': both raise, nothing written, the retry succeeds on both
    assert "injected failure" in r1["error3"] and "failed on rank(s) [1]" in r0["error3"]
    for r in (r0, r1):
        assert torch.equal(r["after3"], r["before3"]) and r["snapshots3"] == 4
        assert r["error3b"] is None and not torch.equal(r["after3b"], r["before3"])
    assert torch.equal(r0["after3b"], r1["after3b"]) and torch.equal(r0["final"], r1["final"])

    # 4. a silent rank 1: rank 0 gives up after the timeout, rank 1 when it finds rank 0 gone; both skip the step
    _check_skipped(r0["silent"])
    _check_skipped(r1["silent"])


def test_ranks_holding_different_parameters_fail_the_step(tmp_path):
    """Processes that do not train the same model (their snapshots differ) would each predict their share from
    their own values: every rank skips the step instead, nothing written."""
    res = _spawn(tmp_path, "unsynced")
    for r in (res[0], res[1]):
        assert "crash" not in r, r.get("crash")
        assert r["error"] is None and torch.equal(r["after"], r["before"]) and r["snapshots"] == 0
    assert not torch.equal(res[0]["before"], res[1]["before"])


def _check_skipped(r):
    assert r["error"] is None  # on_error='skip': a warning, the step skipped
    assert torch.equal(r["after"], r["before"]) and r["snapshots"] == 0
    assert "CommError" in r["broken"]  # later NiNo steps fail at once instead of waiting on a broken group
    assert r["seconds"] < TIMEOUT + 20  # the group's timeout and some slack, never a hang


def test_dead_rank_fails_the_step_on_the_others_without_hanging(tmp_path):
    res = _spawn(tmp_path, "die")
    assert set(res) == {0} and "crash" not in res[0], res
    _check_skipped(res[0]["dead"])


# ---- transformers models: GPT-2 and Llama ------------------------------------------------------------------------
def _transformer(arch: str) -> nn.Module:
    """A tiny GPT-2 or Llama (grouped-query attention), the same on every rank."""
    torch.manual_seed(0)
    return tiny_transformer(arch)


def _lm_steps(opt, ddp, tokens) -> None:
    """Base steps until the next call is a NiNo step."""
    while not opt.next_step_nino:
        opt.zero_grad()
        ddp(tokens, labels=tokens).loss.backward()
        opt.step()


def _transformer_worker(rank, world, init_file, out_dir, ckpt_path):
    """As torchrun runs it (OMP_NUM_THREADS=1: one torch and one BLAS thread): a NiNo step of each model."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    out = {}
    for arch in ("gpt2", "llama"):
        try:
            model = _transformer(arch)
            ddp = nn.parallel.DistributedDataParallel(model)
            tokens = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(100 + rank))
            base = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
            opt = NiNo(base, ddp, ckpt=str(ckpt_path), period=PERIOD, max_train_steps=100, distributed=True)
            _lm_steps(opt, ddp, tokens)
            out[arch] = {"state": copy.deepcopy(opt.state_dict()), "model": copy.deepcopy(model.state_dict())}
            out[arch]["error"] = _nino(opt)
            out[arch]["after"] = flat(model)
        except Exception as exc:
            out[arch] = {"crash": f"{type(exc).__name__}: {exc}"}
    torch.save(out, Path(out_dir) / f"{rank}.pt")
    dist.destroy_process_group()


def test_ddp_transformer_nino_steps_are_one_process_steps(tmp_path):
    """GPT-2 and Llama (attention heads, positional embeddings, grouped-query attention, LPEs with repeated
    eigenvalues): the sharded NiNo step of the wrapper is one process's step bit for bit, at the same torch and BLAS
    thread counts (one each, as under torchrun)."""
    from threadpoolctl import threadpool_limits

    from nino_fast._env import torch_threads

    ctx = mp.get_context("spawn")
    args = (2, tmp_path / "init", tmp_path, ckpt("nino_no_posw.pt"))
    procs = [ctx.Process(target=_transformer_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            for q in procs:
                q.kill()
            pytest.fail("a process hung")
    res = {r: torch.load(tmp_path / f"{r}.pt") for r in range(2)}
    for arch in ("gpt2", "llama"):
        r0, r1 = res[0][arch], res[1][arch]
        assert "crash" not in r0 and "crash" not in r1, (r0.get("crash"), r1.get("crash"))
        assert r0["error"] is None and r1["error"] is None
        assert torch.equal(r0["after"], r1["after"])
        model = _transformer(arch)
        model.load_state_dict(r0["model"])
        with torch_threads(1), threadpool_limits(1):  # the LPE is solved in NiNo(): with the workers' BLAS threads
            opt = NiNo(
                torch.optim.AdamW(model.parameters(), lr=1e-2),
                model,
                ckpt=str(ckpt("nino_no_posw.pt")),
                period=PERIOD,
                max_train_steps=100,
            )
            opt.load_state_dict(r0["state"])
            assert opt.next_step_nino
            opt.step()
        assert torch.equal(flat(model), r0["after"]), (flat(model) - r0["after"]).abs().max()
