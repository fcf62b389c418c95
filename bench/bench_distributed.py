"""Sharded NiNo step over torch.distributed (gloo, CPU): one process vs P processes, memory, time, communication.

    python -m bench.bench_distributed [--models llama2m [llama8m]] [--nproc 2] [--states full local] [--k 10]

Every run is a fresh process. Per model: first ``single`` (``NiNoModel.nowcast``), then for each ``--states`` mode
``torchrun --standalone --nproc-per-node P`` (``python -m torch.distributed.run``) over ``nowcast_sharded``:

- ``full``: every rank holds the whole history (n_params, 5), as in DDP training with ``NiNo(distributed=True)``;
- ``local``: every rank holds only the rows of the parameters on its edges (``states[param_shard(...).ids]``).

Each worker builds the neural graph from the model's named shapes (computed here with ``transformers.LlamaConfig``
on the meta device and passed as JSON, so the workers never import transformers; the LPE comes from the on-disk
cache that the single run fills), loads the checkpoint, makes the same random history and runs the step once; a
rank builds only its part of the graph (``build_graph_shard``: never the whole graph). It
reports

- ``baseline_rss``: its RSS after the imports (torch, nino_fast) and, for ranks, the process group's set-up: the
  cost of being a Python/torch process at all, counted in every peak below;
- ``peak_rss`` / ``ru_maxrss``: the process's high-water mark (``VmHWM``) and ``getrusage(RUSAGE_SELF)``;
- ``peak_before_step``: the high-water mark before the step (graph build, model, history);
- ``step_s``: wall time of the step (ranks run one thread each, torchrun's default; one process uses all cores);
- ranks: the bytes each sent to all-reduces, per collective (the input check, one ``(N, D)`` float32 aggregation
  per message pass, the ``(n_params + P,)`` prediction; with ``local`` also the ``(T,)`` scaling sums).

Exactness: every rank's prediction is compared with the others (bit for bit), with the single process (max abs and
relative difference) and with one more single process run at the ranks' thread count (MKL's GEMMs round
differently with a different number of threads; at the same count the ``full`` mode is bitwise equal).
Results: bench/results/distributed_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import LLAMA, current_rss, llama_shapes, peak_rss, run_isolated, write_results

MODELS = {k: LLAMA[k] for k in ("llama2m", "llama8m", "llama251k", "llama111m")}  # the 2M point, 8M, 251K, 111M
DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "nino_no_posw.pt"


def named_shapes(name: str) -> dict:
    named, heads = llama_shapes(name)
    return dict(named=named, **heads)


BLOCK = 1 << 16


def history(n_params: int, rows: torch.Tensor | None = None, ctx: int = 5, seed: int = 0) -> torch.Tensor:
    """A deterministic random history (n_params, ctx), or only its ``rows`` (sorted): initial values, a drift and
    noise per step, made in blocks of rows with a generator per block, so that any subset is made without the
    whole (and making it does not set the processes' peak)."""
    out = torch.empty(n_params if rows is None else rows.numel(), ctx)
    at = 0
    for b0 in range(0, n_params, BLOCK):
        b1 = min(n_params, b0 + BLOCK)
        if rows is None:
            pick = None
        else:
            lo, hi = torch.searchsorted(rows, torch.tensor([b0, b1], dtype=rows.dtype)).tolist()
            if lo == hi:
                continue
            pick = rows[lo:hi] - b0
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b0 // BLOCK)
        p0 = torch.randn(b1 - b0, 1, generator=gen) * 0.02
        drift = torch.randn(b1 - b0, 1, generator=gen) * 1e-3
        block = drift * torch.arange(ctx) + p0 + torch.randn(b1 - b0, ctx, generator=gen).cumsum(1) * 2e-4
        block = block if pick is None else block[pick]
        out[at : at + block.shape[0]] = block
        at += block.shape[0]
    return out


def worker(args):
    import nino_fast  # noqa: F401  (counted in the baseline: every process imports it)
    from nino_fast import NiNoModel, build_graph

    rank = world = None
    if args.worker == "rank":
        import torch.distributed as dist

        from nino_fast.distributed import build_graph_shard, nowcast_sharded

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
    baseline = current_rss()
    t0 = time.perf_counter()
    spec = json.loads(Path(args.shapes).read_text())
    named = [(n, tuple(s)) for n, s in spec["named"]]
    kwargs = dict(arch="llama", num_heads=spec["num_heads"], num_key_value_heads=spec["num_key_value_heads"], lpe=8)
    shard = None
    if rank is None:
        graph = build_graph(named, **kwargs)
    else:  # only this rank's part of the graph, never the whole
        graph = build_graph_shard(named, rank, world, **kwargs)
        shard = graph
    nino = NiNoModel.from_checkpoint(args.ckpt)
    states = history(graph.num_params, rows=shard.ids if args.states == "local" and shard is not None else None)
    setup_s = time.perf_counter() - t0
    before = peak_rss()
    stats: dict = {}
    if rank is not None:
        dist.barrier()  # time the step alone, not the other rank's set-up
        t1 = time.perf_counter()
        pred = nowcast_sharded(nino, graph, states, args.k, stats=stats, max_memory=args.max_memory)
    else:
        t1 = time.perf_counter()
        pred = nino.nowcast(graph, states, args.k, max_memory=args.single_max_memory)
    step_s = time.perf_counter() - t1
    res = dict(
        impl="single" if rank is None else f"rank-{args.states}",
        max_memory=args.max_memory if rank is not None else args.single_max_memory,
        rank=rank,
        world=world,
        model=args.model,
        params=graph.num_params,
        edges=graph.num_edges,
        nodes=graph.num_nodes,
        states_rows=states.shape[0],
        baseline_rss_bytes=baseline,
        peak_before_step_bytes=before,
        peak_rss_bytes=peak_rss(),
        ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        setup_s=setup_s,
        step_s=step_s,
        threads=torch.get_num_threads(),
        **stats,
    )
    tag = f"single{args.tag}" if rank is None else f"{args.states}{rank}"
    torch.save(pred, Path(args.out_dir) / f"pred_{tag}.pt")
    (Path(args.out_dir) / f"res_{tag}.json").write_text(json.dumps(res))
    if rank is not None:
        dist.destroy_process_group()
    print(json.dumps(res))


def run_torchrun(args, states: str, shapes: str, out_dir: str) -> list[dict]:
    """``torchrun --standalone --nproc-per-node P`` over this module's rank worker; the ranks' result rows."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "bench.bench_distributed",
        *_worker_args(args, "rank", shapes, out_dir),
        f"--states={states}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((Path(out_dir) / f"res_{states}{r}.json").read_text()) for r in range(args.nproc)]


def _worker_args(args, worker: str, shapes: str, out_dir: str) -> list[str]:
    return [
        f"--worker={worker}",
        f"--model={args.model}",
        f"--ckpt={args.ckpt}",
        f"--k={args.k}",
        f"--timeout={args.timeout}",
        f"--shapes={shapes}",
        f"--out-dir={out_dir}",
        *([f"--max-memory={args.max_memory}"] if args.max_memory else []),
        *([f"--single-max-memory={args.single_max_memory}"] if args.single_max_memory else []),
    ]


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()
    return dict(
        max_abs_diff=d.max().item(),
        max_rel_diff=(d.max() / b.double().abs().max()).item(),
        bit_identical=bool(torch.equal(a, b)),
    )


def _summary(single: dict, rows: list[dict]) -> dict:
    """Peak of the largest rank against the single process, in total and above each one's import baseline."""
    peak = max(r["peak_rss_bytes"] for r in rows)
    base = max(r["baseline_rss_bytes"] for r in rows)
    return dict(
        max_rank_peak_rss_bytes=peak,
        rank_baseline_rss_bytes=base,
        peak_fraction_of_single=peak / single["peak_rss_bytes"],
        above_baseline_fraction_of_single=(peak - base) / (single["peak_rss_bytes"] - single["baseline_rss_bytes"]),
        step_s=max(r["step_s"] for r in rows),
        allreduce_bytes_per_rank=rows[0]["allreduce_bytes"],
        allreduce_log=rows[0]["allreduce_log"],
        ranks_identical=all(r["same_as_rank0"] for r in rows),
        max_abs_diff_vs_single=max(r["vs_single_max_abs_diff"] for r in rows),
        max_rel_diff_vs_single=max(r["vs_single_max_rel_diff"] for r in rows),
        bit_identical_to_single=all(r["vs_single_bit_identical"] for r in rows),
        threads_per_rank=rows[0]["threads"],
        **{
            f"{k}_same_threads": max(r[f"vs_single_{rows[0]['threads']}thr_{k}"] for r in rows)
            for k in ("max_abs_diff", "max_rel_diff")
        },
        bit_identical_to_single_same_threads=all(r[f"vs_single_{rows[0]['threads']}thr_bit_identical"] for r in rows),
    )


def _with_threads(threads: int, fn):
    """``fn()`` with OMP_NUM_THREADS set to ``threads`` for the processes it starts."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


def bench_model(args, model: str) -> dict:
    """One model: single process, the ranks for each ``--states`` mode, and the exactness reference."""
    args.model = model
    singles, ranks = [], {m: [] for m in args.states}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = str(Path(tmp) / "shapes.json")  # transformers runs here only: the workers do not import it
        Path(shapes).write_text(json.dumps(named_shapes(model)))
        for _ in range(args.repeat):
            singles.append(run_isolated("bench.bench_distributed", _worker_args(args, "single", shapes, tmp)))
            single_pred = torch.load(Path(tmp) / "pred_single.pt")
            for mode in args.states:
                rows = run_torchrun(args, mode, shapes, tmp)
                preds = [torch.load(Path(tmp) / f"pred_{mode}{r}.pt") for r in range(args.nproc)]
                for r, row in enumerate(rows):
                    row.update({f"vs_single_{k}": v for k, v in _diff(preds[r], single_pred).items()})
                    row["same_as_rank0"] = bool(torch.equal(preds[r], preds[0]))
                ranks[mode].append(rows)
            # exactness at the ranks' thread count (torchrun sets OMP_NUM_THREADS=1; MKL's GEMMs round differently
            # with another number of threads): one process with the same count, compared bit for bit
            threads = rows[0]["threads"]
            worker_args = [*_worker_args(args, "single", shapes, tmp), "--tag=t"]
            singles[-1]["same_threads_run"] = _with_threads(
                threads, lambda a=worker_args: run_isolated("bench.bench_distributed", a)
            )
            ref = torch.load(Path(tmp) / "pred_singlet.pt")
            for mode in args.states:
                for r, row in enumerate(ranks[mode][-1]):
                    pred = torch.load(Path(tmp) / f"pred_{mode}{r}.pt")
                    row.update({f"vs_single_{threads}thr_{k}": v for k, v in _diff(pred, ref).items()})
    single = min(singles, key=lambda r: r["peak_rss_bytes"])
    gib, summary = 2**30, {}
    print(
        f"{model}: {single['params']} params, {single['edges']} edges, {single['nodes']} nodes; "
        f"single: peak {single['peak_rss_bytes'] / gib:.3f} GiB (import baseline "
        f"{single['baseline_rss_bytes'] / gib:.3f}, before the step {single['peak_before_step_bytes'] / gib:.3f})"
        f"  step {single['step_s']:.2f} s on {single['threads']} thread(s)"
    )
    for mode, runs in ranks.items():
        best = min(runs, key=lambda rows: max(r["peak_rss_bytes"] for r in rows))
        summary[mode] = _summary(single, best)
        for r in best:
            print(
                f"  {mode:5s} rank {r['rank']}/{r['world']}: peak {r['peak_rss_bytes'] / gib:.3f} GiB (baseline "
                f"{r['baseline_rss_bytes'] / gib:.3f}, before the step {r['peak_before_step_bytes'] / gib:.3f}, "
                f"ru_maxrss {r['ru_maxrss_bytes'] / gib:.3f})  step {r['step_s']:.2f} s  "
                f"sent {r['allreduce_bytes'] / 2**20:.2f} MiB  vs single: max abs {r['vs_single_max_abs_diff']:.2e}"
                f" rel {r['vs_single_max_rel_diff']:.2e}"
            )
        m = summary[mode]
        print(
            f"  {mode:5s} per-rank peak / single peak = {m['peak_fraction_of_single']:.3f} (above the import "
            f"baseline: {m['above_baseline_fraction_of_single']:.3f}); ranks identical {m['ranks_identical']}; "
            f"vs one process at {m['threads_per_rank']} thread(s): bit-identical "
            f"{m['bit_identical_to_single_same_threads']} (max rel {m['max_rel_diff_same_threads']:.1e})"
        )
        print(f"  {mode:5s} all-reduces per rank (bytes): {m['allreduce_log']}")
    per_pass = single["nodes"] * 128 * 4
    print(f"  one message pass: N x D x 4 = {single['nodes']} x 128 x 4 = {per_pass} bytes per rank")
    return dict(single=single, summary=summary, bytes_per_message_pass=per_pass, single_runs=singles, rank_runs=ranks)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama2m"], choices=list(MODELS))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--states", nargs="+", default=["full", "local"], choices=("full", "local"))
    p.add_argument("--repeat", type=int, default=1, help="fresh runs of each; the run with the smallest peak is kept")
    p.add_argument("--timeout", type=float, default=600, help="process group timeout (s)")
    p.add_argument("--worker", choices=("single", "rank"))
    p.add_argument("--model", help=argparse.SUPPRESS)  # (worker)
    p.add_argument("--shapes", help=argparse.SUPPRESS)  # (worker) JSON file with the named shapes and heads
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="do not write the results file")
    p.add_argument("--results", default="distributed_cpu", help="results file: bench/results/<name>.json")
    p.add_argument("--max-memory", help="max_memory of each rank's step (default: the library's)")
    p.add_argument("--single-max-memory", help="max_memory of the single process's step (default: the library's)")
    args = p.parse_args(argv)
    if args.worker:
        args.states = args.states[0]
        return worker(args)
    results = {model: bench_model(args, model) for model in args.models}
    if not args.no_write:
        payload = dict(
            nproc=args.nproc,
            k=args.k,
            states=args.states,
            max_memory=args.max_memory,
            single_max_memory=args.single_max_memory,
            loadavg=os.getloadavg(),
            models=results,
        )
        print(f"# wrote {write_results(args.results, payload)}")


if __name__ == "__main__":
    main()
