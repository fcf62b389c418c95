"""Neural-graph construction at scale: ``build_graph`` (CSR from block descriptors) and the matrix-free LPE.

    python -m bench.bench_graph [--models llama2m llama8m llama111m] [--repeat 3] [--baseline-tree DIR]

For each Llama model (built on the meta device) and each part, ``--repeat`` fresh processes run it once:

- ``build``: ``build_graph(model, lpe=0)``: wall and CPU seconds, the process's peak RSS, and the RSS before
  the build (interpreter, torch, transformers and the meta model; the peak mark is reset there, so
  ``peak - before`` is what the build itself costs);
- ``lpe``: the block layout only (no per-edge array), then ``block_lpe(k=8)`` with the cache off; the same
  timings, plus the eigenvalues and the largest eigen-residual ``|L v - (v' L v) v|`` (checked against a
  bound).

Correctness first, in this process: on the smallest model the CSR graph is compared with the explicit build
(materialised blocks, sorted by destination) and the LPE eigenvalues with the explicit-matrix solver.
``--baseline-tree DIR`` also times ``build`` with the package found in DIR (e.g. ``git archive`` of an older
commit). Medians over the runs; peak RSS is the largest. The machine may be shared: the load average is
recorded. Results: bench/results/graph_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from .common import LLAMA, current_rss, llama_meta, peak_rss, reset_peak_rss, run_isolated, write_results

# 2M / 8M end to end; 111M: Llama 3-tiny; 251K only for the quick run (python -m bench --quick)
MODELS = {k: LLAMA[k] for k in ("llama251k", "llama2m", "llama8m", "llama111m")}
DEFAULT_MODELS = ["llama2m", "llama8m", "llama111m"]
K = 8
MAX_RESIDUAL = 1e-6


def meta_model(name: str):
    return llama_meta(name)


def _residuals(blocks, n, vecs) -> float:
    """Largest ``|L v - (v' L v) v|`` over the eigenvectors, with L applied matrix-free."""
    from nino_fast.graph.adjacency import BlockAdjacency, shifted_normalized_operator

    op, _ = shifted_normalized_operator(BlockAdjacency(blocks, n))
    lv = 2.0 * vecs - op.matmat(vecs)
    ray = np.einsum("nk,nk->k", vecs, lv)
    return float(np.linalg.norm(lv - vecs * ray, axis=0).max())


def worker(part: str, name: str, tree: str | None) -> dict:
    if tree:
        sys.path.insert(0, tree)
    model = meta_model(name)
    from nino_fast.graph import build_graph

    before, peak_before = current_rss(), peak_rss()
    reset_peak_rss()  # the peak of the part itself, not of the imports before it
    t0, c0 = time.perf_counter(), time.process_time()
    if part == "build":
        g = build_graph(model, lpe=0)
        import nino_fast

        res = dict(nodes=g.num_nodes, edges=g.num_edges, params=g.num_params, package=nino_fast.__file__)
        if hasattr(g, "blocks"):
            res["blocks"] = len(g.blocks)
    else:
        from nino_fast.graph.build import build_layout
        from nino_fast.graph.lpe import _encoding, block_laplacian_eigs

        _, _, layout = build_layout(model)
        from nino_fast.graph.blocks import num_nodes

        n = num_nodes(layout.blocks)
        vals, vecs = block_laplacian_eigs(layout.blocks, n, K)
        _encoding(vecs, n, K)  # what block_lpe returns (cache off)
        res = dict(nodes=n, eigenvalues=vals.tolist())
    res.update(
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
        rss_before_bytes=before,
        peak_rss_bytes=max(peak_rss(), peak_before),
    )
    if part == "lpe":
        res["max_residual"] = _residuals(layout.blocks, n, vecs)
    return res


def check_correctness(name: str) -> dict:
    """The block build vs the explicit build, the matrix-free LPE vs the explicit solver, on ``name``."""
    from nino_fast.graph import build_graph
    from nino_fast.graph.build import build_layout
    from nino_fast.graph.lpe import block_laplacian_eigs, laplacian_eigs

    model = meta_model(name)
    g = build_graph(model, lpe=0)
    _, _, layout = build_layout(model)
    ei = layout.materialize()
    types = torch.cat([torch.full((b.num_edges,), b.etype) for b in layout.blocks])
    loops = torch.arange(g.num_nodes)
    ei = torch.cat((ei, torch.stack((loops, loops))), 1)
    types = torch.cat((types, torch.full((g.num_nodes,), 13)))
    order = torch.sort(ei[1], stable=True).indices

    def key(s, d, t):
        return (s.long() * (1 << 40) + d.long() * 256 + t.long()).sort().values

    same = torch.equal(key(g.src, g.dst, g.edge_type), key(ei[0][order], ei[1][order], types[order]))
    same &= torch.equal(torch.bincount(ei[1], minlength=g.num_nodes), g.degree())
    vals, _ = block_laplacian_eigs(g.blocks, g.num_nodes, K)
    ref, _ = laplacian_eigs(g.src.numpy(), g.dst.numpy(), g.num_nodes, K)
    err = float(np.abs(vals - ref).max())
    if not same or err > 1e-9:
        raise AssertionError(f"bench_graph: {name}: edges equal={same}, eigenvalue error={err:.2e}")
    return dict(model=name, edges_equal=same, eigenvalue_max_abs_err=err)


def _summary(runs: list[dict]) -> dict:
    out = {k: v for k, v in runs[0].items() if k not in ("wall_s", "cpu_s", "peak_rss_bytes", "rss_before_bytes")}
    out.update(
        wall_s_median=statistics.median(r["wall_s"] for r in runs),
        wall_s_all=[r["wall_s"] for r in runs],
        cpu_s_median=statistics.median(r["cpu_s"] for r in runs),
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs),
        rss_before_bytes=statistics.median(r["rss_before_bytes"] for r in runs),
    )
    out["peak_minus_before_bytes"] = out["peak_rss_bytes"] - out["rss_before_bytes"]
    if "max_residual" in runs[0]:
        out["max_residual"] = max(r["max_residual"] for r in runs)
        if out["max_residual"] > MAX_RESIDUAL:
            raise AssertionError(f"bench_graph: LPE residual {out['max_residual']:.2e} > {MAX_RESIDUAL}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline-tree", help="a source tree with an older nino_fast, timed for 'build' as well")
    p.add_argument("--baseline-repeat", type=int, default=1, help="runs of the (slow) baseline per model")
    p.add_argument("--worker", choices=["build", "lpe"])
    p.add_argument("--model")
    p.add_argument("--tree")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.tree)))
        return
    results = {
        "load_avg_start": os.getloadavg(),
        "check": check_correctness(min(args.models, key=list(MODELS).index)),
    }
    print(f"# correctness: {results['check']}")
    print(
        f"{'model':<10} {'part':<9} {'nodes':>9} {'edges':>12} {'wall s':>8} {'cpu s':>8} {'peak GB':>8} "
        f"{'+build GB':>9}"
    )
    for name in args.models:
        parts = [("build", None), ("lpe", None)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
        for part, tree in parts:
            wargs = ["--worker", "build" if part == "baseline" else part, "--model", name]
            runs = [
                run_isolated("bench.bench_graph", wargs + (["--tree", tree] if tree else []))
                for _ in range(args.baseline_repeat if part == "baseline" else args.repeat)
            ]
            s = results.setdefault(name, {})[part] = _summary(runs)
            print(
                f"{name:<10} {part:<9} {s['nodes']:>9} {s.get('edges', 0):>12} {s['wall_s_median']:>8.2f} "
                f"{s['cpu_s_median']:>8.2f} {s['peak_rss_bytes'] / 1e9:>8.2f} "
                f"{s['peak_minus_before_bytes'] / 1e9:>9.2f}",
                flush=True,
            )
    results["load_avg_end"] = os.getloadavg()
    print(f"# load average: start {results['load_avg_start']}, end {results['load_avg_end']}")
    print(f"# wrote {write_results('graph_cpu', {'k': K, 'repeat': args.repeat, 'results': results})}")


if __name__ == "__main__":
    main()
