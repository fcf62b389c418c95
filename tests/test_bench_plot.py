"""bench/plot.py: synthetic results files of the benchmarks' schemas in, valid PNGs out; missing files skipped."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.x", "python": "3.x", "host": "vm"}


def _table(path: Path) -> None:
    """A results table of the runner's schema: two runs on CPU (the older one must be ignored), one on CUDA."""
    rows = []
    for run, device in (("20250101T000000Z", "cpu"), ("20260101T000000Z", "cpu"), ("20260101T000000Z", "cuda")):
        for e in (10_000, 100_000, 1_000_000):
            for op in ("film_mean", "edge_mlp", "edge_film_mean", "segment_mean", "train_film", "train_fused"):
                for f, backend in enumerate((device, "pyg", "reference")):
                    t = e * 1e-4 * (1 + f)
                    row = dict(MACHINE_ROW, run=run, device=device, op=op, backend=backend, edges=e, nodes=e // 100)
                    row.update(dim=128, dtype="fp32", median_ms=t, min_ms=0.9 * t, max_ms=1.2 * t, runs=3)
                    peak = 200.0 if device == "cpu" else ""
                    rows.append(dict(row, gflops=50 / (1 + f), peak_gflops=peak, peak_mem_mib=e / 1e4, check_err=1e-7))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


MACHINE_ROW = dict(date="2026-01-01", commit="abc", command="python -m bench", machine="Test CPU",
                   cpu_family_model="6/167", isa="avx512", cores=2, threads=2, torch="2.x")  # fmt: skip


def _e2e() -> dict:
    rows = []
    for m, (model, n) in enumerate((("llama251k", 251_200), ("llama2m", 2_008_192))):
        for impl, slow in (("ours", 1), ("layerwise", 8), ("official", 15)):
            row = dict(graph_s=0.02, step_s=0.4 * slow * (m + 1), impl=impl, model=model)
            row.update(peak_rss_bytes=int(4e8 * slow**0.5 * (m + 1)), total_s=0.42 * slow * (m + 1))
            if impl != "official":
                row.update(params=n, edges=n + 3000, nodes=3000, rel_err_vs_official=3e-7)
            rows.append(row)
    return {"machine": MACHINE, "command": "x", "k": 10, "rows": rows}


def _scale() -> dict:
    rows = []
    runs = [("llama2m", 2e6, None), ("llama8m", 1e7, None), ("llama111m", 1.1e8, None)]
    for model, n, budget in runs + [("llama111m", 1.1e8, "1.75GiB"), ("llama111m", 1.1e8, "4GiB")]:
        row = dict(model=model, params=int(n), edges=int(n * 1.003), nodes=int(n**0.5), step_s=n * 1.8e-6)
        row.update(total_s=n * 1.9e-6, peak_rss_bytes=int(n * 60 + 5e8), max_memory=budget, threads=2, finite=True)
        row["plan"] = {"tiles": 1, "tile_edges": int(n), "raw_held": True, "budget": 2**31, "pass_s": [0.1, 0.2]}
        rows.append(row)
    return {"machine": MACHINE, "command": "x", "k": 10, "rows": rows}


def _run(results: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.plot", "--results", str(results), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 10_000, path  # a real figure, not an empty canvas


def test_all_figures(tmp_path):
    _table(tmp_path / "results.csv")
    (tmp_path / "e2e_cpu.json").write_text(json.dumps(_e2e()))
    (tmp_path / "scale_cpu.json").write_text(json.dumps(_scale()))
    out = tmp_path / "figures"
    _run(tmp_path, out)
    for name in ("ops_cpu", "ops_cuda", "train_cpu", "train_cuda", "e2e_cpu", "scale_cpu"):
        _assert_png(out / f"{name}.png")


def test_missing_and_partial_files_are_skipped(tmp_path):
    """A partial e2e file (no official run, machine, k or RSS), a half-written results table, a non-results file."""
    e2e = _e2e()
    rows = [{k: v for k, v in r.items() if k in ("model", "impl", "total_s")} for r in e2e["rows"]]
    (tmp_path / "e2e_cpu.json").write_text(json.dumps({"rows": [r for r in rows if r["impl"] != "official"]}))
    _table(tmp_path / "full.csv")
    (tmp_path / "results.csv").write_text((tmp_path / "full.csv").read_text()[:700])  # being appended to
    (tmp_path / "scale_cpu.json").write_text("[]")  # not a results file
    proc = _run(tmp_path, tmp_path)
    _assert_png(tmp_path / "e2e_cpu.png")
    for name in ("ops_cpu", "ops_cuda", "train_cpu", "scale_cpu"):
        assert not (tmp_path / f"{name}.png").exists()
    assert "skip scale_cpu.png" in proc.stdout
    assert "skip ops_*.png, train_*.png" in proc.stdout
