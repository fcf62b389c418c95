"""NiNo step at scale on the CPU: the 2M, 8M and 111M-parameter ("Llama 3-tiny") Llama graphs, exact.

    python -m bench.bench_scale [--models llama2m llama8m llama111m] [--max-memory 2GiB] [--extra-budgets 1GiB 4GiB]
                                [--threads N] [--ckpt CKPT]

Each model runs in a fresh process (so its peak RSS is its own), one after the other; ``--extra-budgets`` adds
runs of the last model with other ``max_memory`` values (the tile size / raw-feature trade-off):

1. the Llama model on the meta device (``transformers.LlamaConfig``, untied embeddings, nothing downloaded);
2. ``build_graph(model, lpe=0)`` (graph time), then ``block_lpe(k=8)`` with the disk cache off (LPE time);
3. a synthetic (n_params, 5) float32 history (initial values, a drift and noise; made in chunks);
4. ``NiNoModel.nowcast(graph, states, k)`` with the streamed folded plan (step time, wall and CPU seconds).

Memory: the process's peak RSS over all phases, the RSS the step starts from (interpreter, torch, graph, history,
model) and the step's own peak above it (the peak mark is reset before the step). Per edge: step wall time in µs
and bytes (the whole process's peak, and the step's own part). The step's tile plan (tiles, raw features kept or
rebuilt, seconds per pass) comes from the ``nino_fast.stream`` debug log record.

Correctness: every prediction is checked finite; for graphs of at most ``--check-max-edges`` edges the step is
compared, after timing, with the in-memory plan (``scale_params`` + ``NiNoModel._delta`` + ``_finish``): max
relative error and whether it is bitwise equal. The machine may be shared: the load average is recorded.
Results: bench/results/scale_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time

import torch

from .bench_e2e import DEFAULT_CKPT
from .bench_graph import MODELS, meta_model
from .common import current_rss, peak_rss, reset_peak_rss, run_isolated, write_results


def history(n_params: int, ctx: int = 5, seed: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    """A deterministic synthetic (n_params, ctx) history, made chunk by chunk (no (P, ctx) temporaries)."""
    out = torch.empty(n_params, ctx)
    steps = torch.arange(ctx, dtype=torch.float32)
    for i, a in enumerate(range(0, n_params, chunk)):
        n = min(n_params, a + chunk) - a
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        p0 = torch.randn(n, 1, generator=gen) * 0.02
        drift = torch.randn(n, 1, generator=gen) * 1e-3
        out[a : a + n] = p0 + drift * steps + torch.randn(n, ctx, generator=gen).cumsum(1) * 2e-4
    return out


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Stats(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.stats: dict = {}

    def emit(self, record):
        self.stats.update(getattr(record, "nino_stats", {}))


def worker(args) -> dict:
    from nino_fast import NiNoModel, build_graph
    from nino_fast.graph.lpe import block_lpe
    from nino_fast.scaling import scale_params

    if args.threads:
        torch.set_num_threads(args.threads)
    load_avg_start = os.getloadavg()
    model = meta_model(args.model)
    t0, c0 = time.perf_counter(), _cpu_s()
    graph = build_graph(model, lpe=0)
    build_s, build_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    t0 = time.perf_counter()
    graph.lpe = block_lpe(graph.blocks, graph.num_nodes, 8, cache=False)
    lpe_s = time.perf_counter() - t0
    states = history(graph.num_params)
    nino = NiNoModel.from_checkpoint(args.ckpt)
    handler = _Stats()
    logger = logging.getLogger("nino_fast.stream")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)

    peak_before = peak_rss()  # the graph build's peak
    rss_inputs = current_rss()
    reset_peak_rss()
    t0, c0 = time.perf_counter(), _cpu_s()
    pred = nino.nowcast(graph, states, args.k, max_memory=args.max_memory, progress=False)
    step_s, step_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    step_peak = peak_rss()
    E = graph.num_edges
    row = dict(
        model=args.model,
        params=graph.num_params,
        edges=E,
        nodes=graph.num_nodes,
        build_s=build_s,
        build_cpu_s=build_cpu_s,
        lpe_s=lpe_s,
        step_s=step_s,
        step_cpu_s=step_cpu_s,
        total_s=build_s + lpe_s + step_s,
        peak_rss_bytes=max(peak_before, step_peak),
        build_peak_rss_bytes=peak_before,
        rss_before_step_bytes=rss_inputs,
        step_peak_rss_bytes=step_peak,
        step_extra_bytes=step_peak - rss_inputs,
        us_per_edge=step_s / E * 1e6,
        bytes_per_edge=max(peak_before, step_peak) / E,
        step_bytes_per_edge=(step_peak - rss_inputs) / E,
        max_memory=args.max_memory,
        threads=torch.get_num_threads(),
        plan=handler.stats,
        finite=bool(torch.isfinite(pred).all()),
        load_avg_start=load_avg_start,
        load_avg_end=os.getloadavg(),
    )
    if E <= args.check_max_edges:  # after timing: the in-memory plan holds (P, C) and (E, C) copies
        scaled, scales = scale_params(states, graph.param_shapes, nino.scale_method)
        ref = nino._finish(graph, scaled, nino._delta(graph, scaled, args.k), scales, states.dtype)
        row["rel_err_vs_in_memory"] = ((pred - ref).abs().max() / ref.abs().max()).item()
        row["bitwise_equal_in_memory"] = bool(torch.equal(pred, ref))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama2m", "llama8m", "llama111m"], choices=list(MODELS))
    p.add_argument("--max-memory", default=None, help="nowcast's max_memory (default: its own default)")
    p.add_argument(
        "--extra-budgets", nargs="*", default=[], help="more runs of the last model with these max_memory values"
    )
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--check-max-edges", type=int, default=20_000_000)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--out", default="scale_cpu", help="results file name under bench/results")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--model")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    runs = [(name, args.max_memory) for name in args.models]
    runs += [(args.models[-1], budget) for budget in args.extra_budgets]
    for name, budget in runs:
        extra = ["--max-memory", budget] if budget else []
        flags = ["--ckpt", args.ckpt, "--k", str(args.k), "--check-max-edges", str(args.check_max_edges)]
        flags += ["--threads", str(args.threads)]
        try:
            r = run_isolated("bench.bench_scale", ["--worker", "--model", name, *flags, *extra])
        except RuntimeError as exc:  # e.g. a max_memory too small for the graph: recorded, the other runs go on
            error = str(exc).strip().splitlines()[-1]
            rows.append(dict(model=name, max_memory=budget, error=error))
            print(f"{name:10s} {budget or 'default':>8s} failed: {error}", flush=True)
            continue
        rows.append(r)
        check = f"  rel.err {r['rel_err_vs_in_memory']:.1e}" if "rel_err_vs_in_memory" in r else ""
        print(
            f"{name:10s} {budget or 'default':>8s} {r['params'] / 1e6:7.2f}M params {r['edges'] / 1e6:7.2f}M edges"
            f" | graph {r['build_s']:6.1f} s LPE {r['lpe_s']:6.1f} s step {r['step_s']:7.1f} s"
            f" total {r['total_s']:7.1f} s | peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:5.2f} GiB (step +{r['step_extra_bytes'] / 2**30:4.2f}) | "
            f"{r['us_per_edge']:5.2f} µs/edge {r['bytes_per_edge']:5.1f} B/edge | tiles {r['plan'].get('tiles')} "
            f"raw {'kept' if r['plan'].get('raw_held') else 'rebuilt'}{check}",
            flush=True,
        )
    path = write_results(args.out, {"k": args.k, "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
