"""NiNo step on one GPU: Llama models up to the 111M-parameter "Llama 3-tiny", time and peak GPU memory.

    python -m bench.bench_gpu_e2e [--models llama2m llama3tiny] [--backend triton] [--repeat 3]
                                  [--edge-dtype bf16] [--max-memory 8GiB] [--out e2e_gpu]

The graph is built on the CPU (``build_graph``); its LPE is replaced by a fixed random (N, 8) tensor for the
largest model (the step's cost does not depend on LPE values; computing it is the CPU's job, timed in
bench_graph). The step (``NiNoModel.nowcast``: scaling, edge features, the fused GNN plan, head, unscaling) runs
on the GPU after a warm-up; the output is checked finite and, for the small model, against the reference
backend. ``--edge-dtype bf16``: bfloat16 edge features (``nowcast(edge_dtype=torch.bfloat16)``); its predicted
deltas are compared with the float32 step's. Results: bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from .bench_e2e import DEFAULT_CKPT, MODELS, trajectory
from .common import LLAMA, llama_meta, write_results

MODELS = dict(MODELS, llama3tiny=LLAMA["llama111m"])


def main(argv=None):
    from nino_fast import NiNoModel, build_graph

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama2m", "llama3tiny"])
    p.add_argument("--backend", default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--edge-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-memory", default=None, help="nowcast's max_memory (default: half the free GPU memory)")
    p.add_argument("--out", default="e2e_gpu", help="results file name under bench/results/")
    args = p.parse_args(argv)
    opts = dict(backend=args.backend, max_memory=args.max_memory)
    if args.edge_dtype == "bf16":
        opts["edge_dtype"] = torch.bfloat16
    nino = NiNoModel.from_checkpoint(args.ckpt).cuda()
    rows = []
    for name in args.models:
        model = llama_meta(name, MODELS)
        t0 = time.perf_counter()
        big = name == "llama3tiny"
        graph = build_graph(model, lpe=0 if big else 8)
        if big:
            graph.lpe = torch.randn(graph.num_nodes, 8, generator=torch.Generator().manual_seed(0)) * 0.01
        t_graph = time.perf_counter() - t0
        states = trajectory(graph.num_params)
        g_cuda = graph.to("cuda")  # moved once, like a training loop that keeps its graph on the GPU
        s_cuda = states.cuda()
        out = nino.nowcast(g_cuda, s_cuda, args.k, **opts)  # warm-up (compiles the kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            out = nino.nowcast(g_cuda, s_cuda, args.k, **opts)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
        peak = torch.cuda.max_memory_allocated() - base
        row = dict(
            model=name,
            params=graph.num_params,
            edges=graph.num_edges,
            nodes=graph.num_nodes,
            graph_cpu_s=t_graph,
            step_s=sorted(times)[len(times) // 2],
            step_min_s=min(times),
            peak_gpu_bytes_step=peak,
            finite=bool(torch.isfinite(out).all()),
            edge_dtype=args.edge_dtype,
            max_memory=args.max_memory,
        )
        if args.edge_dtype != "fp32":  # vs the float32 step, on the predicted change
            full = nino.nowcast(g_cuda, s_cuda, args.k, backend=args.backend, max_memory=args.max_memory)
            last = s_cuda[:, -1]
            d_ref = full - last
            row["delta_rel_err_vs_fp32"] = ((out - last - d_ref).abs().max() / d_ref.abs().max()).item()
            del full, d_ref
        if not big:
            ref = nino.nowcast(g_cuda, s_cuda, args.k, backend="reference", max_memory=args.max_memory)
            row["rel_err_vs_reference"] = ((out - ref).abs().max() / ref.abs().max()).item()
        rows.append(row)
        print(row, flush=True)
        del g_cuda, s_cuda, out
        torch.cuda.empty_cache()
    path = write_results(args.out, {"k": args.k, "backend": args.backend, "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
