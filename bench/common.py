"""Shared benchmark utilities: timing, peak memory, the machine's measured FMA peak, results files.

Every benchmark checks correctness before timing, reports medians over repeats, and writes
``bench/results/<name>.json`` with the machine description, so RESULTS.md can quote the exact numbers.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        **_cpu_family_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_family_model() -> dict:
    """lscpu's CPU family and model numbers (from /proc/cpuinfo), e.g. {"cpu_family": 6, "cpu_model": 167}."""
    keys = {"cpu family": "cpu_family", "model": "cpu_model"}
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys and keys[key.strip()] not in out and value.strip().isdigit():
                    out[keys[key.strip()]] = int(value)
                if not line.strip():
                    break
    except OSError:
        pass
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeat: int = 5, warmup: int = 1, device="cpu", min_time: float = 0.0) -> dict:
    """Median/min/max seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
    }


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size (bytes) of this process since start or the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_isolated(module: str, args: list[str], timeout: float = 3600) -> dict:
    """Run ``python -m module args`` in a fresh process (clean peak-RSS accounting); it prints one JSON line last."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FMA_SRC = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
/* Throughput of independent FMAs of vector type V (VEC floats wide): 10 named accumulators (registers, not an
   array) hide the FMA latency on both FMA ports. Returns the best GFLOP/s over 3 repetitions. */
#define FMA10 a0 = FMADD(a0, m, c); a1 = FMADD(a1, m, c); a2 = FMADD(a2, m, c); a3 = FMADD(a3, m, c); \
  a4 = FMADD(a4, m, c); a5 = FMADD(a5, m, c); a6 = FMADD(a6, m, c); a7 = FMADD(a7, m, c); a8 = FMADD(a8, m, c); \
  a9 = FMADD(a9, m, c);
#if WIDTH == 512
#define V __m512
#define VEC 16
#define FMADD _mm512_fmadd_ps
#define SET1 _mm512_set1_ps
#define ADD _mm512_add_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#else
#define V __m256
#define VEC 8
#define FMADD _mm256_fmadd_ps
#define SET1 _mm256_set1_ps
#define ADD _mm256_add_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#endif
double fma_gflops(int64_t iters, int threads) {
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      V a0 = SET1(1.0f), a1 = SET1(1.1f), a2 = SET1(1.2f), a3 = SET1(1.3f), a4 = SET1(1.4f), a5 = SET1(1.5f),
        a6 = SET1(1.6f), a7 = SET1(1.7f), a8 = SET1(1.8f), a9 = SET1(1.9f);
      const V m = SET1(0.999999f), c = SET1(1e-7f);
      for (int64_t it = 0; it < iters; ++it) { FMA10 }
      V s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(ADD(a6, a7), ADD(a8, a9))));
      sink += FIRST(s);
    }
    double sec = omp_get_wtime() - t0;
    double gf = 2.0 * VEC * 10 * (double)iters * threads / sec / 1e9;
    if (sink != 12345.f && gf > best) best = gf;
  }
  return best;
}
"""


def fma_peak_gflops(threads: int | None = None) -> float:
    """Measured fp32 FMA peak of this CPU on ``threads`` cores, GFLOP/s: a loop of independent FMAs of the widest
    vectors it runs (AVX-512 where the CPU has it, else AVX2); 0 if not measurable. The same ISA the kernels are
    built for (setup.py), so fractions of this peak are honest."""
    import ctypes
    import tempfile

    threads = threads or torch.get_num_threads()
    from nino_fast._extension import cpu_has_avx512

    width = 512 if cpu_has_avx512() else 256
    isa = ["-mavx512f"] if width == 512 else []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, lib = Path(tmp) / "fma.c", Path(tmp) / "fma.so"
            src.write_text(_FMA_SRC)
            subprocess.run(
                ["cc", "-O2", "-mavx2", "-mfma", *isa, f"-DWIDTH={width}", "-fopenmp", "-shared", "-fPIC"]
                + [str(src), "-o", str(lib)],
                check=True,
                capture_output=True,
            )
            fn = ctypes.CDLL(str(lib)).fma_gflops
            fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64, ctypes.c_int]
            return float(fn(50_000_000, threads))
    except Exception as exc:  # no compiler, no AVX2
        print(f"# FMA peak not measured: {exc}", file=sys.stderr)
        return 0.0


def results_dir() -> Path:
    """Where the scripts write ``<name>.json``: bench/results, or $NINO_FAST_BENCH_RESULTS (the quick runs of
    ``python -m bench --quick``, which must not overwrite the recorded results)."""
    return Path(os.environ.get("NINO_FAST_BENCH_RESULTS") or RESULTS)


def write_results(name: str, payload: dict) -> Path:
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


# ---- the Llama models the benchmarks use (transformers.LlamaConfig arguments; untied embeddings) ------------------
LLAMA = {
    "llama251k": dict(  # the 251K-parameter variant
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
    "llama2m": dict(  # the 2.0M-parameter end-to-end model (2.02M edges)
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4000,
    ),
    "llama8m": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
    ),
    "llama111m": dict(  # the official "Llama 3-tiny" (111.48M parameters)
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=128256,
    ),
}


def llama_meta(name: str, configs: dict | None = None):
    """The Llama model ``name`` on the meta device (nothing allocated, nothing downloaded)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(**(configs or LLAMA)[name], tie_word_embeddings=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def llama_shapes(name: str, configs: dict | None = None) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """((name, shape) of every parameter, {num_heads, num_key_value_heads}) of the Llama model ``name``."""
    model = llama_meta(name, configs)
    heads = dict(num_heads=model.config.num_attention_heads, num_key_value_heads=model.config.num_key_value_heads)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()], heads
