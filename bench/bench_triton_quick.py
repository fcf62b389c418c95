"""Quick timing of the Triton backend's fused ops on a CUDA GPU (correctness checked first).

    python -m bench.bench_triton_quick [--sizes 1e4 1e5 1e6] [--dtypes fp32 bf16] [--cases film5 fused5 ...]
                                       [--block-e 16 32 64] [--chunk N] [--num-warps 4 8] [--heavy 100000]

Random destination-sorted graph with average in-degree 100 (``--heavy k`` adds a node with k more
in-edges), D = 128, 15 edge types. For every case and dtype it first compares the Triton op with the
pure-PyTorch reference (float64): fp32 must match to 1e-5 relative to the output's magnitude, bf16 must be
within 2x of PyTorch's own bf16 error. Then it times the op with ``triton.testing.do_bench`` (median ms) and
reports GEMM TFLOP/s (2 M N K per product the maths needs, as in bench/setups), the speed-up over the
reference in the same dtype, and the peak extra memory. ``--block-e`` / ``--num-warps`` / ``--block-kh``
lists are swept (launch heuristics otherwise). Results go to bench/results/ops_triton_quick.json. Set
NINO_FAST_TRITON_FP32=tf32x3 to time fp32 with 3xTF32 dots.

Cases (the model's calls are film5/film45, fused5/fused45, edge5, head):

    film5 / film45     film_mean, C = 5 / 45, type table
    fused5 / fused45   edge_film_mean, C = 5 / 45, type table
    edge5              edge_mlp C = 5, D' = 128, type table, four gathers, act_out (edge update 1)
    edge128            edge_mlp C = 128, D' = 128, no gathers
    head               edge_mlp C = 128, D' = 9 (the output head)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

import torch

from .common import write_results

D = 128
T = 15
CASES = ("film5", "film45", "fused5", "fused45", "edge5", "edge128", "head")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def graph(n_edges: int, heavy: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = max(n_edges // 100, 2)
    dst = torch.randint(0, n, (n_edges,), generator=gen)
    if heavy:
        dst = torch.cat((dst, torch.zeros(heavy, dtype=torch.long)))
    dst = dst.sort().values
    e = dst.numel()
    src = torch.randint(0, n, (e,), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return n, e, rowptr.to(device), src.to(device), dst.to(torch.int32).to(device), gen


def setup(case: str, n_edges: int, heavy: int, device):
    """(op name, float args builder(dtype), GEMM flops)."""
    n, e, rowptr, src, dst, gen = graph(n_edges, heavy, device)
    c = 45 if case.endswith("45") else 5 if case.endswith("5") else 128

    def r(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    feat, etype = r(e, c, scale=0.5), torch.randint(0, T, (e,), generator=gen).to(device)
    if case.startswith("film"):
        name, flops = "film_mean", 2 * D * c * (e + n)
        args = [feat, rowptr, src, r(n, D), r(n, D), r(2 * D, c), r(2 * D), etype, r(T, 2 * D)]
    elif case.startswith("fused"):
        name, flops = "edge_film_mean", 2 * D * c * e + 2 * D * D * (e + n)
        args = [
            feat,
            rowptr,
            src,
            r(D, c),
            r(D),
            etype,
            r(T, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(D, D),
            r(D),
            r(D, D),
            r(D),
        ]
    elif case == "head":
        name, flops = "edge_mlp", 2 * D * (c + 9) * e
        args = [feat, src, dst, r(D, c), r(D), r(9, D), r(9), None, None, None, None, None, None, False]
    elif case == "edge5":
        name, flops = "edge_mlp", 2 * D * (c + D) * e
        args = [
            feat,
            src,
            dst,
            r(D, c),
            r(D),
            r(D, D),
            r(D),
            etype,
            r(T, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(n, D),
            True,
        ]
    else:
        name, flops = "edge_mlp", 2 * D * (c + D) * e
        args = [feat, src, dst, r(D, c), r(D), r(D, D), r(D), None, None, None, None, None, None, False]

    def cast(dtype):
        return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]

    return name, cast, flops, e


def check(name, cast, dtype) -> dict:
    """Correctness against the float64 reference."""
    from nino_fast.ops import reference, triton_backend

    exact = getattr(reference, name)(*cast(torch.float64))
    got = triton_backend.LAUNCHERS[name](*cast(dtype)).double()
    scale = max(1.0, exact.abs().max().item())
    err = (got - exact).abs().max().item()
    if dtype == torch.float32:
        ok, bound = err <= 1e-5 * scale, 1e-5 * scale
    else:
        torch_err = (getattr(reference, name)(*cast(dtype)).double() - exact).abs().max().item()
        ok, bound = err <= 2 * torch_err + 1e-6, 2 * torch_err + 1e-6
    return {"max_err": err, "bound": bound, "ok": bool(ok)}


def _wall_clock(fn, warmup=1, rep=1, return_mode="median"):
    """do_bench's signature on CPU (the interpreter smoke test): one timed run, in ms."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _peak_extra(fn, dev) -> int:
    """Bytes allocated by ``fn`` at its peak beyond what was allocated before it (CUDA; 0 elsewhere)."""
    fn()
    if dev.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--heavy", type=int, default=0, help="extra in-edges of node 0 (a long row)")
    p.add_argument("--block-e", nargs="+", type=int, default=[None])
    p.add_argument("--num-warps", nargs="+", type=int, default=[None])
    p.add_argument("--block-kh", nargs="+", type=int, default=[None], help="h column chunk (edge ops)")
    p.add_argument("--maxnreg", nargs="+", type=int, default=[None], help="register cap per thread")
    p.add_argument("--chunk", type=int, default=None, help="edges per long-row window (CSR ops)")
    p.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    args = p.parse_args(argv)
    import triton

    if torch.cuda.is_available():
        from triton.testing import do_bench

        dev = torch.device("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1":  # a smoke test of this script on CPU (tiny --sizes)
        do_bench, dev = _wall_clock, torch.device("cpu")
    else:
        raise SystemExit("bench_triton_quick needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke test)")

    from nino_fast.ops import reference, triton_backend
    from nino_fast.triton_kernels import edge_film_mean, edge_mlp, film_mean, utils

    launchers = {
        "film_mean": film_mean.film_mean,
        "edge_mlp": edge_mlp.edge_mlp,
        "edge_film_mean": edge_film_mean.edge_film_mean,
    }
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"# {gpu}  triton {triton.__version__}  torch {torch.__version__}  D={D}  fp32 dots: {utils.FP32_PRECISION}")
    rows = []
    for size, case, dname in itertools.product(args.sizes, args.cases, args.dtypes):
        name, cast, flops, e = setup(case, int(size), args.heavy, dev)
        dtype = DTYPES[dname]
        acc = check(name, cast, dtype)
        if not acc["ok"]:
            print(f"E={e:>9d} {case:8s} {dname:4s} FAILED: max error {acc['max_err']:.3e} > {acc['bound']:.3e}")
            rows.append({"case": case, "op": name, "dtype": dname, "E": e, **acc})
            continue
        inputs = cast(dtype)
        ref_ms = None
        if not args.no_reference:
            ref_fn = functools.partial(getattr(reference, name), *inputs)
            ref_ms = do_bench(ref_fn, warmup=10, rep=50, return_mode="median")
        sweep = itertools.product(args.block_e, args.num_warps, args.block_kh, args.maxnreg)
        for block_e, warps, block_kh, maxnreg in sweep:
            kw = {"block_e": block_e, "num_warps": warps, "maxnreg": maxnreg}
            if name != "edge_mlp":
                kw["chunk"] = args.chunk
            if name != "film_mean":
                kw["block_kh"] = block_kh
            if any(v is not None for v in kw.values()):  # the launcher, with overrides
                fn = functools.partial(launchers[name], *inputs, **kw)
            else:  # the custom op, as the model calls it
                fn = functools.partial(triton_backend.LAUNCHERS[name], *inputs)
            peak = _peak_extra(fn, dev)
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            row = {
                "case": case,
                "op": name,
                "dtype": dname,
                "E": e,
                "block_e": block_e,
                "num_warps": warps,
                "block_kh": block_kh,
                "maxnreg": maxnreg,
                "chunk": args.chunk,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "ref_ms": ref_ms,
                "speedup_vs_ref": None if ref_ms is None else ref_ms / ms,
                "peak_extra_mb": peak / 2**20,
                **acc,
            }
            rows.append(row)
            sp = "" if ref_ms is None else f"  ref {ref_ms:8.3f} ms  x{ref_ms / ms:6.1f}"
            cfg = "".join(f"  {k}={v}" for k, v in kw.items() if v is not None)
            print(
                f"E={e:>9d} {case:8s} {dname:4s} {ms:8.3f} ms  {flops / ms / 1e9:7.2f} TFLOP/s{sp}  "
                f"peak+{peak / 2**20:7.1f} MiB  err {acc['max_err']:.1e}{cfg}",
                flush=True,
            )
    if dev.type != "cuda":
        print("# interpreter smoke test: no results file written")
        return
    path = write_results(
        "ops_triton_quick",
        {"D": D, "fp32_precision": utils.FP32_PRECISION, "heavy": args.heavy, "rows": rows},
    )
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
