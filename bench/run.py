"""The benchmark runner: every op and layer of nino_fast on every backend, one results table.

    python -m bench [--ops all|OP ...] [--backends ours reference pyg] [--sizes 1e4 1e5 1e6] [--dim 128]
                    [--edge-dim C] [--dtypes fp32] [--device cpu|cuda] [--repeat 5] [--out bench/results/results.csv]
    python -m bench --quick [--no-scripts]      # every benchmark at small sizes (make bench-quick)

Ops (one setup module each in bench/setups/): film_mean, edge_mlp, edge_film_mean, segment_mean (the ops'
forward), train_film, train_edge, train_fused (the nn layers' training step, forward + backward). Backends:
ours (the best compiled one: cpu, cuda or triton; or name one), reference, compiled (torch.compile of the
reference; ops only), pyg (PyG MessagePassing versions; skipped when torch_geometric is not installed, and only
those setups import it). Backends that the device or op lacks are skipped with a message.

Per (op, backend, E, dtype): first a check against the float64 reference on the same maths (E <= 20000; a
mismatch aborts the run), then a warm-up call and medians over ``--repeat`` timed calls. Each point runs in a
fresh process (``--isolate``, the default except with ``--quick``) so that its peak memory is its own: the rise
of the process's peak RSS over the timed calls on CPU, ``max_memory_allocated`` on CUDA. GFLOP/s counts the
minimal formulation's GEMM FLOPs (the same count for every backend) and is also given as % of the CPU's measured
FMA peak (bench.common.fma_peak_gflops). Rows are appended to one CSV table with the machine (CPU model,
family/model, the ISA the kernels were built for, cores), torch version, git commit and date; bench/report.py
writes RESULTS.md's tables and bench/plot.py the figures from it.

``--quick``: E = 1e4, 3 repeats, in process, rows to build/bench/quick.csv (rewritten); then (unless
``--no-scripts``) every other bench script at its smallest setting, their JSON results written under build/bench/
(not bench/results).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import setups
from .common import RESULTS, current_rss, fma_peak_gflops, peak_rss, reset_peak_rss, run_isolated, sync, timeit
from .setups import DTYPES, TOL, Case, Unsupported

ROOT = Path(__file__).resolve().parents[1]
TABLE = RESULTS / "results.csv"
QUICK_DIR = ROOT / "build" / "bench"
CHECK_EDGES = 20_000
COLUMNS = (
    "run", "date", "commit", "command", "machine", "cpu_family_model", "isa", "cores", "threads", "torch", "device",
    "op", "backend", "edges", "nodes", "dim", "edge_dim", "dtype", "median_ms", "min_ms", "max_ms", "runs", "gflops",
    "peak_gflops", "pct_peak", "gbps", "peak_mem_mib", "check_err", "load1",
)  # fmt: skip
# Every other bench script at its smallest setting (--quick); (module, args, needs a GPU).
SCRIPTS = (
    ("bench.bench_e2e", ["--models", "llama251k", "--impls", "ours", "layerwise"], False),
    ("bench.bench_meta", ["--hids", "32", "--batch", "1", "--spt", "1", "--batches", "1", "--repeat", "1"], False),
    ("bench.bench_graph", ["--models", "llama251k", "--repeat", "1"], False),
    ("bench.bench_scale", ["--models", "llama251k"], False),
    ("bench.bench_distributed", ["--models", "llama251k", "--states", "full"], False),
    ("bench.bench_disk_step", ["--models", "llama251k", "--runs", "memory", "disk"], False),
    ("bench.bench_meta_eval", ["--seeds", "1", "--steps", "100", "--tasks", "demo", "--predictors", "ours"], False),
    ("bench.bench_metanet", ["--batch", "8", "--batches", "1", "--repeat", "1", "--hid", "32"], False),
    ("bench.bench_gpu_e2e", ["--models", "llama2m", "--repeat", "1"], True),
    ("bench.bench_cuda_quick", ["--sizes", "1e4"], True),  # kernel cases the table lacks (C = 5 / 45, type tables)
    ("bench.bench_triton_quick", ["--sizes", "1e4"], True),  # and the Triton launch-parameter sweeps
)


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def machine_info(device: str) -> dict:
    """The columns describing where a row was measured."""
    from nino_fast._extension import cpu_isa

    cpu = _lscpu()
    name = cpu.get("Model name") or platform.processor() or "unknown CPU"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    return {
        "machine": name,
        "cpu_family_model": f"{cpu.get('CPU family', '?')}/{cpu.get('Model', '?')}",
        "isa": cpu_isa() or "none",
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def git_commit() -> str:
    """The commit of the nino_fast that runs (``-dirty`` if its nino_fast/, csrc/ or triton_kernels/ differ)."""
    import nino_fast

    repo = Path(nino_fast.__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "nino_fast", "csrc", "triton_kernels")
    return head + ("-dirty" if dirty else "")


def _tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


_WANT: dict = {}


def check(module, case: Case, backend: str) -> float:
    """Max relative error of ``backend`` vs the float64 reference on a small version of ``case``; raises above
    the dtype's tolerance."""
    small = case.replace(edges=min(case.edges, CHECK_EDGES))
    key = small.replace(dtype="fp64")
    if key not in _WANT:
        _WANT[key] = [t.detach().double() for t in _tensors(module.setup(key, "reference").fn())]
    got = _tensors(module.setup(small, backend).fn())
    if len(got) != len(_WANT[key]):
        raise AssertionError(f"{case.op}/{backend}: {len(got)} outputs, the reference has {len(_WANT[key])}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, _WANT[key], strict=True)):
        if a is None or a.shape != b.shape:
            raise AssertionError(f"{case.op}/{backend}: output {i} is {None if a is None else tuple(a.shape)}, "
                                 f"the reference's is {tuple(b.shape)}")  # fmt: skip
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0
        worst = max(worst, err)
    if not worst <= TOL[case.dtype]:
        raise AssertionError(
            f"{case.op}/{backend} ({case.dtype}, E={small.edges}) differs from the reference: max relative "
            f"error {worst:.2e} > {TOL[case.dtype]:.0e}"
        )
    return worst


def measure(case: Case, backend: str, repeat: int) -> dict:
    """Check, warm up, time: one row's measured columns (raises Unsupported for a missing backend)."""
    module = setups.registry()[case.op]
    backend = setups.resolve_backend(backend, case)
    err = check(module, case, backend)
    s = module.setup(case, backend)
    s.fn()  # warm-up: thread pools, allocator caches, compilation, the layers' CSR cache
    sync(case.device)
    gc.collect()
    cuda = torch.device(case.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = current_rss()
    load = os.getloadavg()[0]  # the machine is shared: how busy it was when this row was timed
    stats = timeit(s.fn, repeat=repeat, warmup=0, device=case.device)
    mem = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    med = stats["median_s"]
    return {
        "op": case.op, "backend": backend, "edges": case.edges, "nodes": case.nodes, "dim": case.dim,
        "edge_dim": case.edge_dim, "dtype": case.dtype, "device": case.device, "median_ms": med * 1e3,
        "min_ms": stats["min_s"] * 1e3, "max_ms": stats["max_s"] * 1e3, "runs": stats["runs"],
        "gflops": s.flops / med / 1e9, "gbps": s.bytes / med / 1e9, "peak_mem_mib": max(mem, 0) / 2**20,
        "check_err": err, "load1": load,
    }  # fmt: skip


def _worker(spec: str) -> None:
    a = json.loads(spec)
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    try:
        row = measure(Case(**a["case"]), a["backend"], a["repeat"])
    except Unsupported as exc:
        row = {"skipped": str(exc)}
    print(json.dumps(row))


def append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != COLUMNS:  # appending would misalign the columns
            raise SystemExit(f"bench: {path} has other columns than this runner writes; move it away or migrate it")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_table(path: Path = TABLE) -> list[dict]:
    """The rows of a results table (numbers as float where they parse)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v) if k not in ("run", "commit", "cpu_family_model") and v not in ("", None) else v
            except ValueError:
                pass
    return rows


def run_scripts(out_dir: Path) -> bool:
    """Every other bench script at its smallest setting; their JSON goes to ``out_dir``. True if all passed."""
    env = dict(os.environ, NINO_FAST_BENCH_RESULTS=str(out_dir))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    ok = True
    for module, args, gpu in SCRIPTS:
        if gpu and not torch.cuda.is_available():
            print(f"skip {module}: no GPU")
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"{module} {' '.join(args)}: {status} in {time.perf_counter() - t0:.1f} s", flush=True)
        if proc.returncode:
            ok = False
            print(proc.stdout[-2000:] + proc.stderr[-4000:])
    return ok


def _ops(names: list[str]) -> list[str]:
    known = setups.registry()
    ops = list(known) if names in (["all"], []) else names
    bad = [o for o in ops if o not in known]
    if bad:
        raise SystemExit(f"bench: unknown op(s) {bad}; known: {list(known)}")
    return ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["all"])
    p.add_argument("--backends", nargs="+", default=["ours", "reference", "pyg"])
    p.add_argument("--sizes", nargs="+", type=float, default=None, help="edges E (default 1e4 1e5 1e6; quick 1e4)")
    p.add_argument("--dim", type=int, default=128, help="D, the node and hidden width")
    p.add_argument("--edge-dim", type=int, default=None, help="C, the input edge-feature width (default: D)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per point (default 5; quick 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None, help="a process per point")
    p.add_argument("--out", type=Path, default=None, help=f"results table (default {TABLE.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="small sizes, in process, then the other scripts")
    p.add_argument("--no-scripts", action="store_true", help="with --quick: only the runner's table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker) or 0
    quick = args.quick
    sizes = [int(float(e)) for e in (args.sizes or ([1e4] if quick else [1e4, 1e5, 1e6]))]
    repeat = args.repeat or (3 if quick else 5)
    isolate = (not quick) if args.isolate is None else args.isolate
    out = args.out or (QUICK_DIR / "quick.csv" if quick else TABLE)
    if quick and args.out is None:
        out.unlink(missing_ok=True)  # a scratch table: each quick run starts it afresh
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = _ops(args.ops)
    backends = list(dict.fromkeys(args.backends))
    if "pyg" in backends and importlib.util.find_spec("torch_geometric") is None:
        print("skip pyg: torch_geometric is not installed (pip install 'nino_fast[pyg]')")
        backends.remove("pyg")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"skip device {args.device}: no CUDA GPU")
        return 0

    common = machine_info(args.device)
    peak = fma_peak_gflops() if args.device == "cpu" else None
    t_start = time.perf_counter()
    common.update(
        run=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        date=dt.date.today().isoformat(),
        commit=git_commit(),
        command=shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]).replace(
            str(ROOT) + os.sep, ""
        ),
        peak_gflops=peak or "",
    )
    print(f"# {common['machine']} (family/model {common['cpu_family_model']}, {common['isa']} kernels, "
          f"{common['cores']} cores), torch {common['torch']}, FMA peak {peak or 0:.0f} GFLOP/s -> {out}")  # fmt: skip
    for e in sizes:
        for dtype in args.dtypes:
            for op in ops:
                for backend in backends:
                    case = Case(
                        op, e, dim=args.dim, edge_dim=args.edge_dim or args.dim, dtype=dtype, device=args.device
                    )
                    r = (e < 1e6 and repeat) or max(3, repeat // 2 + 1)
                    if isolate:
                        spec = dict(case=case.__dict__, backend=backend, repeat=r, threads=args.threads)
                        row = run_isolated("bench.run", ["--worker", json.dumps(spec)])
                    else:
                        try:
                            row = measure(case, backend, r)
                        except Unsupported as exc:
                            row = {"skipped": str(exc)}
                    if "skipped" in row:
                        print(f"skip {op} {backend} E={e}: {row['skipped']}")
                        continue
                    row = {**common, **row}
                    if peak:
                        row["pct_peak"] = 100 * row["gflops"] / peak
                    append(out, [row])
                    print(
                        f"{op:15s} {row['backend']:9s} E={e:>8d} {dtype:4s} {row['median_ms']:10.2f} ms "
                        f"{row['gflops']:7.1f} GFLOP/s {row['peak_mem_mib']:8.1f} MiB  err {row['check_err']:.1e}",
                        flush=True,
                    )
    print(f"# table: {time.perf_counter() - t_start:.0f} s, rows appended to {out}")
    if quick and not args.no_scripts:
        return 0 if run_scripts(QUICK_DIR / "results") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
