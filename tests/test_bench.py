"""The benchmark runner (python -m bench): a quick run appends complete rows to its table, the report renders them,
and the rows without PyG never import torch_geometric."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nino_fast import _extension

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _extension.has_ext(), reason="needs the compiled extension nino_fast._C")

# One op and one layer at a tiny size, in process; afterwards, whether PyG was imported.
SCRIPT = """
import json, sys
from bench.run import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "pyg_imported": "torch_geometric" in sys.modules}))
"""
ARGS = ["--quick", "--no-scripts", "--ops", "film_mean", "train_edge", "--sizes", "300", "--repeat", "1"]


def _run(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_appends_complete_rows_without_pyg(tmp_path):
    from bench.run import COLUMNS

    table = tmp_path / "results.csv"
    out = _run(*ARGS, "--backends", "ours", "reference", "--out", str(table))
    assert out == {"rc": 0, "pyg_imported": False}
    rows = _rows(table)
    assert [(r["op"], r["backend"]) for r in rows] == [
        ("film_mean", "cpu"), ("film_mean", "reference"), ("train_edge", "cpu"), ("train_edge", "reference"),
    ]  # fmt: skip
    for r in rows:
        assert tuple(r) == COLUMNS
        empty = [k for k, v in r.items() if v in ("", None)]
        assert not empty, f"empty columns {empty} in {r}"
        assert float(r["median_ms"]) > 0 and float(r["check_err"]) < 1e-4 and r["edges"] == "300"
    assert len({r["run"] for r in rows}) == 1

    _run(*ARGS, "--ops", "segment_mean", "--backends", "reference", "--out", str(table))  # appends, one header
    again = _rows(table)
    assert len(again) == len(rows) + 1 and again[:-1] == rows and again[-1]["op"] == "segment_mean"

    report = subprocess.run(
        [sys.executable, "-m", "bench.report", "--table", str(table), "--run", rows[0]["run"], "--print"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "| film_mean | 300 |" in report.stdout and "| EdgeUpdate | 300 |" in report.stdout
    assert max(len(line) for line in report.stdout.splitlines()) <= 120


def test_pyg_rows_match_when_installed(tmp_path):
    pytest.importorskip("torch_geometric")
    table = tmp_path / "results.csv"
    out = _run(*ARGS, "--backends", "pyg", "--out", str(table))
    assert out == {"rc": 0, "pyg_imported": True}
    assert [(r["op"], r["backend"]) for r in _rows(table)] == [("film_mean", "pyg"), ("train_edge", "pyg")]
