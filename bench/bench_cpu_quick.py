"""Quick timing of the CPU extension's fused ops (a developer tool; the full comparison is bench_ops.py).

    python -m bench.bench_cpu_quick [--sizes 1e5 1e6] [--cases film128 edge128 fused128 ...] [--repeat 5]

Random destination-sorted graph with average in-degree 100, D = 128. GFLOP/s counts the GEMMs the maths needs
(2 M N K each): per-edge GEMMs, plus the per-node shift GEMV of film_mean / edge_film_mean. Cases:

    film128 / film5    film_mean, C = 128 / 5          (per edge: D x C scale GEMM; per node: D x C shift GEMV)
    edge128            edge_mlp C = 128, D' = 128      (per edge: two D x D GEMMs)
    edge5              edge_mlp C = 5, D' = 128, type table, gathers, act_out (the model's edge update 1)
    head               edge_mlp C = 128, D' = 1        (the model's output head)
    fused128 / fused5  edge_film_mean, C = 128 / 5     (per edge: D x C and D x D GEMMs; per node: D x D GEMV)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

D = 128
CASES = ("film128", "edge128", "fused128", "film5", "edge5", "fused5", "head")


def graph(n_edges: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = max(n_edges // 100, 2)
    dst = torch.randint(0, n, (n_edges,), generator=gen).sort().values
    src = torch.randint(0, n, (n_edges,), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return n, rowptr, src, dst.to(torch.int32), gen


def setup(case: str, n_edges: int):
    """(callable, GEMM flops) for one case."""
    n, rowptr, src, dst, gen = graph(n_edges)
    c = 5 if case.endswith("5") else 128

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    feat, etype = r(n_edges, c, scale=0.5), torch.randint(0, 15, (n_edges,), generator=gen)
    ops = torch.ops.nino_fast
    if case.startswith("film"):
        args = (feat, rowptr, src, r(n, D), r(n, D), r(2 * D, c), r(2 * D), etype, r(15, 2 * D))
        return (lambda: ops.film_mean(*args)), 2 * D * c * (n_edges + n)
    if case.startswith("fused"):
        args = (
            feat,
            rowptr,
            src,
            r(D, c),
            r(D),
            etype,
            r(15, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(D, D),
            r(D),
            r(D, D),
            r(D),
        )
        return (lambda: ops.edge_film_mean(*args)), 2 * D * c * n_edges + 2 * D * D * (n_edges + n)
    if case == "head":
        args = (feat, src, dst, r(D, c), r(D), r(1, D), r(1), None, None, None, None, None, None, False)
        return (lambda: ops.edge_mlp(*args)), 2 * D * (c + 1) * n_edges
    tables = (etype, r(15, D), r(n, D), r(n, D), r(n, D), r(n, D)) if case == "edge5" else (None,) * 6
    args = (feat, src, dst, r(D, c), r(D), r(D, D), r(D), *tables, case == "edge5")
    return (lambda: ops.edge_mlp(*args)), 2 * D * (c + D) * n_edges


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import nino_fast  # noqa: F401  (loads the extension)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# threads={torch.get_num_threads()} D={D}")
    for e in args.sizes:
        for case in args.cases:
            fn, flops = setup(case, int(e))
            fn()
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            print(
                f"E={int(e):>8d} {case:9s} {med * 1e3:9.2f} ms (min {min(times) * 1e3:9.2f})"
                f"  {flops / med / 1e9:7.1f} GFLOP/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
