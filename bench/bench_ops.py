"""Per-op benchmark: our fused ops vs a PyG MessagePassing version of the same maths vs the reference (oracle) vs
``torch.compile(oracle)``, at E in {1e4, 1e5, 1e6}, D = 128 (edge features of width C = D).

    python -m bench.bench_ops [--sizes 1e4 1e5 1e6] [--device cpu|cuda] [--impls ours pyg oracle compiled]

Ops: ``film`` (FiLM message + mean), ``edge`` (edge update: two D x D GEMMs), ``fused`` (edge update fused with the
next layer's FiLM message + mean; PyG runs the two ops in sequence). Correctness of every implementation against the
float64 reference is checked on E = 1e4 before anything is timed. Each (op, impl, E) is timed in a fresh process
(medians over repeats) so its peak RSS increase is its own. Results: bench/results/ops_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from nino_fast.ops import dispatch
from nino_fast.ops import reference as ref

from .common import (
    current_rss,
    fma_peak_gflops,
    peak_rss,
    reset_peak_rss,
    run_isolated,
    sync,
    timeit,
    write_results,
)

D = 128
OPS = ("film", "edge", "fused")


def make_case(n_edges: int, device="cpu", seed=0):
    """A random destination-sorted graph with average in-degree 100 and module weights for every op."""
    gen = torch.Generator().manual_seed(seed)
    n = max(n_edges // 100, 2)
    dst = torch.randint(0, n, (n_edges,), generator=gen).sort().values
    src = torch.randint(0, n, (n_edges,), generator=gen)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    torch.manual_seed(seed)
    from .pyg_ref import EdgeMLPPyG, FiLMConvPyG  # noqa: F401  (imported lazily: PyG is optional)

    c = dict(
        rowptr=rowptr,
        src=src.to(torch.int32),
        dst=dst.to(torch.int32),
        edge_index=torch.stack((src, dst)),
        x=torch.randn(n, D, generator=gen),
        x2=torch.randn(n, D, generator=gen),
        e=torch.randn(n_edges, D, generator=gen) * 0.5,
    )
    return {k: v.to(device) for k, v in c.items()}


def modules(device):
    from .pyg_ref import EdgeMLPPyG, FiLMConvPyG

    torch.manual_seed(1)
    return FiLMConvPyG(D, D).to(device).eval(), EdgeMLPPyG(D).to(device).eval()


def op_args(op, case, film, edge):
    """Our ops' arguments for the same maths as the PyG modules (per-node terms precomputed)."""
    x, x2 = case["x"], case["x2"]
    pre_w, pre_b = film.pre.weight, film.pre.bias
    if op == "film":  # only the per-node terms this op uses (all of them timed with it)
        nd, ns = F.linear(x, pre_w[:, :D], pre_b), F.linear(x, pre_w[:, D:])
    else:
        s, t = F.linear(x, edge.lin_s.weight), F.linear(x, edge.lin_t.weight)
        bias = edge.lin_e.bias + edge.lin_s.bias + edge.lin_t.bias
    if op == "film":
        return (
            "film_mean",
            (
                case["e"],
                case["rowptr"],
                case["src"],
                nd,
                ns,
                film.edge_encoder.weight,
                film.edge_encoder.bias,
            ),
        )
    if op == "edge":
        return (
            "edge_mlp",
            (
                case["e"],
                case["src"],
                case["dst"],
                edge.lin_e.weight,
                bias,
                edge.lin1.weight,
                edge.lin1.bias,
                None,
                None,
                s,
                t,
            ),
        )
    enc_w, enc_b, w1, b1 = film.edge_encoder.weight, film.edge_encoder.bias, edge.lin1.weight, edge.lin1.bias
    nd2, ns2 = F.linear(x2, pre_w[:, :D], pre_b), F.linear(x2, pre_w[:, D:])
    return (
        "edge_film_mean",
        (
            case["e"],
            case["rowptr"],
            case["src"],
            edge.lin_e.weight,
            bias,
            None,
            None,
            s,
            t,
            nd2,
            ns2,
            enc_w[:D] @ w1,
            enc_w[:D] @ b1 + enc_b[:D],
            enc_w[D:] @ w1,
            enc_w[D:] @ b1 + enc_b[D:],
        ),
    )


def runner(op, impl, case, film, edge, backend):
    """A zero-argument callable computing ``op`` with ``impl`` (per-node precompute included for ours)."""
    if impl == "pyg":
        ei, x, e = case["edge_index"], case["x"], case["e"]
        if op == "film":
            return lambda: film(x, ei, e)
        if op == "edge":
            return lambda: edge(x, ei, e)
        return lambda: film(case["x2"], ei, edge(x, ei, e))
    if impl == "compiled":
        fns = {
            "film_mean": torch.compile(ref.film_mean),
            "edge_mlp": torch.compile(ref.edge_mlp),
            "edge_film_mean": torch.compile(ref.edge_film_mean),
        }
        name = op_args(op, case, film, edge)[0]
        return lambda: fns[name](*op_args(op, case, film, edge)[1])
    use = "reference" if impl == "oracle" else backend
    fn = getattr(dispatch, op_args(op, case, film, edge)[0])
    return lambda: fn(*op_args(op, case, film, edge)[1], backend=use)


def flops(op, impl, n_edges, n_nodes):
    """FLOPs the implementation's own formulation performs (GEMMs only; 2 per multiply-add)."""
    gemm = 2 * D * D
    if impl == "pyg" or impl in ("oracle", "compiled"):
        per_edge = {
            "film": 2 * gemm + (2 * gemm if impl == "pyg" else gemm),
            "edge": 2 * gemm,
            "fused": (6 * gemm if impl == "pyg" else 4 * gemm),
        }[op]
        return per_edge * n_edges
    per_edge = {"film": gemm, "edge": 2 * gemm, "fused": 2 * gemm}[op]  # shift halves summed per node first
    return per_edge * n_edges + (gemm * n_nodes if op in ("film", "fused") else 0)


def check_all(impls, device, backend):
    case = make_case(10_000, device)
    film, edge = modules(device)
    with torch.no_grad():
        want = {}
        c64 = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
        f64, e64 = film.double(), edge.double()
        for op in OPS:
            want[op] = runner(op, "oracle", c64, f64, e64, "reference")()
        film.float(), edge.float()
        for op in OPS:
            for impl in impls:
                got = runner(op, impl, case, film, edge, backend)().double()
                err = (got - want[op]).abs().max().item() / want[op].abs().max().item()
                print(f"# check {op:5s} {impl:8s} rel err {err:.1e}", file=sys.stderr)
                if err > 1e-4:
                    raise AssertionError(f"{op}/{impl} differs from the reference: {err:.2e}")


def worker(op, impl, n_edges, device, backend, repeat):
    case = make_case(n_edges, device)
    film, edge = modules(device)
    fn = runner(op, impl, case, film, edge, backend)
    with torch.no_grad():
        fn()  # first call: thread pools, allocator caches, compilation
        sync(device)
        reset_peak_rss()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = current_rss()
        stats = timeit(fn, repeat=repeat, warmup=0, device=device)
    mem = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss() - base
    n_nodes = case["rowptr"].numel() - 1
    stats.update(
        op=op,
        impl=impl,
        edges=n_edges,
        nodes=n_nodes,
        extra_peak_bytes=mem,
        gflops=flops(op, impl, n_edges, n_nodes) / stats["median_s"] / 1e9,
    )
    print(json.dumps(stats))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--device", default="cpu")
    p.add_argument("--impls", nargs="+", default=["ours", "pyg", "oracle", "compiled"])
    p.add_argument("--ops", nargs="+", default=list(OPS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--worker", nargs=3, metavar=("OP", "IMPL", "E"))
    args = p.parse_args(argv)
    backend = dispatch.resolve(args.device)
    if args.worker:
        op, impl, e = args.worker
        return worker(op, impl, int(float(e)), args.device, backend, args.repeat)
    check_all(args.impls, args.device, backend)
    peak = fma_peak_gflops() if args.device == "cpu" else None
    rows = []
    for e in args.sizes:
        for op in args.ops:
            for impl in args.impls:
                repeat = args.repeat if e < 1e6 else max(2, args.repeat // 2)
                r = run_isolated(
                    "bench.bench_ops",
                    ["--worker", op, impl, str(int(e)), "--device", args.device, "--repeat", str(repeat)],
                )
                r["backend"] = backend if impl == "ours" else impl
                if peak:
                    r["fraction_of_fma_peak"] = r["gflops"] / peak
                rows.append(r)
                print(
                    f"E={int(e):>8d} {op:5s} {impl:8s} {r['median_s'] * 1e3:10.2f} ms  {r['gflops']:7.1f} GFLOP/s"
                    f"  +{r['extra_peak_bytes'] / 2**20:8.1f} MiB",
                    flush=True,
                )
    path = write_results(f"ops_{args.device}", {"fma_peak_gflops": peak, "backend": backend, "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
