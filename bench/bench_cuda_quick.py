"""Quick timing of the CUDA extension's fused ops on one GPU (a developer tool; the full comparison:
python -m bench --device cuda).

    python -m bench.bench_cuda_quick [--sizes 1e4 1e5 1e6] [--dtypes fp32 bf16] [--cases film5 fused45 ...]

Random destination-sorted graph with average in-degree 100 (N = E / 100), D = 128, 15 edge types. Every case
is first checked against the pure-PyTorch reference (fp64, on the GPU); then timed with CUDA events over
batches of back-to-back calls (median of --repeat batches), host-side checks and helper kernels included.
TFLOP/s counts the GEMMs the maths needs (2 M N K each): per-edge GEMMs plus the per-node shift GEMV of
film_mean / edge_film_mean (the same counts as bench/setups). Dtypes:

    fp32       every float input fp32 (3xTF32 tensor-core path; matches the reference to ~1e-6)
    bf16       every float input bf16 (node tables gathered as bf16)
    bf16-feat  bf16 edge features only; weights, biases, tables, node terms fp32 (as the folded plan calls it)

Cases (C = raw edge-feature width):

    film5 / film45     film_mean, C = 5 / 45                         (the model's layer 0)
    fused5 / fused45   edge_film_mean, C = 5 / 45                    (edge update 0 + layer 1's message pass)
    edge5              edge_mlp, C = 5, D' = 128, table, gathers, act_out   (edge update 1)
    edge128            edge_mlp, C = 128, D' = 128, no gathers
    head               edge_mlp, C = 128, D' = 9                     (the output head)

Writes bench/results/ops_cuda_quick.json (machine, case, E, dtype, ms, TFLOP/s, error, peak memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import machine, results_dir
from nino_fast.ops import reference as ref

D = 128
TYPES = 15
CASES = ("film5", "film45", "fused5", "fused45", "edge5", "edge128", "head")
TOL = {"fp32": 1e-5, "bf16": 3e-2, "bf16-feat": 3e-2}  # max |error| / max |reference|


def graph(n_edges: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = max(n_edges // 100, 2)
    dst = torch.randint(0, n, (n_edges,), generator=gen).sort().values
    src = torch.randint(0, n, (n_edges,), generator=gen).to(torch.int32)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return n, rowptr.to(device), src.to(device), dst.to(torch.int32).to(device), gen


def setup(case: str, n_edges: int, dtype: str, device="cuda"):
    """(op name, args in fp64 for the reference, args for the kernel, GEMM flops) of one case."""
    n, rowptr, src, dst, gen = graph(n_edges, device)
    c = 5 if case.endswith("5") else 45 if case.endswith("45") else 128

    def r(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    feat, etype = r(n_edges, c, scale=0.5), torch.randint(0, TYPES, (n_edges,), generator=gen).to(device)
    if case.startswith("film"):
        name = "film_mean"
        args = (feat, rowptr, src, r(n, D), r(n, D), r(2 * D, c), r(2 * D), etype, r(TYPES, 2 * D))
        flops = 2 * D * c * (n_edges + n)
    elif case.startswith("fused"):
        name = "edge_film_mean"
        args = (
            feat,
            rowptr,
            src,
            r(D, c),
            r(D),
            etype,
            r(TYPES, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(n, D),
            r(D, D),
            r(D),
            r(D, D),
            r(D),
        )
        flops = 2 * D * c * n_edges + 2 * D * D * (n_edges + n)
    elif case == "head":
        name = "edge_mlp"
        args = (feat, src, dst, r(D, c), r(D), r(9, D), r(9), None, None, None, None, None, None, False)
        flops = 2 * D * (c + 9) * n_edges
    else:
        name = "edge_mlp"
        tables = (etype, r(TYPES, D), r(n, D), r(n, D), r(n, D), r(n, D)) if case == "edge5" else (None,) * 6
        args = (feat, src, dst, r(D, c), r(D), r(D, D), r(D), *tables, case == "edge5")
        flops = 2 * D * (c + D) * n_edges

    def cast(i, a):
        if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
            return a
        if dtype == "fp32" or (dtype == "bf16-feat" and i != 0):
            return a.float()
        return a.bfloat16()

    kernel_args = tuple(cast(i, a) for i, a in enumerate(args))
    # the reference sees exactly the values the kernel gets (rounded to bf16 where the kernel's input is)
    ref_args = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in kernel_args)
    return name, ref_args, kernel_args, flops


def time_cuda(fn, repeat: int, target_ms: float = 20.0) -> float:
    """Median milliseconds per call over ``repeat`` batches of back-to-back calls (~target_ms per batch)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    inner = max(1, min(200, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(TOL))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default=str(results_dir() / "ops_cuda_quick.json"))
    args = p.parse_args(argv)
    import nino_fast  # noqa: F401  (loads the extension)
    from nino_fast.ops import dispatch

    if "cuda" not in dispatch.available_backends("cuda"):
        raise SystemExit("bench_cuda_quick: the CUDA kernels are not built or no GPU is visible")
    info = machine()
    print(f"# {info.get('gpu')}  torch {info['torch']}  D={D}")
    rows = []
    for e in args.sizes:
        for dtype in args.dtypes:
            for case in args.cases:
                name, ref_args, kernel_args, flops = setup(case, int(e), dtype)
                op = getattr(torch.ops.nino_fast, name)
                want = getattr(ref, name)(*ref_args)
                got = op(*kernel_args)
                err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                del want
                ok = err <= TOL[dtype]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = time_cuda(lambda op=op, a=kernel_args: op(*a), args.repeat)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                tflops = flops / (ms * 1e-3) / 1e12
                rows.append(
                    dict(
                        case=case,
                        op=name,
                        edges=int(e),
                        dtype=dtype,
                        ms=ms,
                        tflops=tflops,
                        rel_err=err,
                        ok=ok,
                        peak_extra_mib=peak,
                    )
                )
                print(
                    f"E={int(e):>8d} {dtype:9s} {case:8s} {ms:9.4f} ms  {tflops:7.2f} TFLOP/s  err {err:.1e}"
                    f"{'' if ok else '  MISMATCH'}  +{peak:7.1f} MiB",
                    flush=True,
                )
                del ref_args, kernel_args
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "command": "python -m bench.bench_cuda_quick", "results": rows}, f, indent=1)
    print(f"# wrote {args.out}")
    if not all(r["ok"] for r in rows):
        raise SystemExit("bench_cuda_quick: some case did not match the reference (see MISMATCH above)")


if __name__ == "__main__":
    main()
