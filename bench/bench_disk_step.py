"""``nino-fast step`` on bf16 Hugging Face checkpoints on disk: the history in memory vs read from disk tile by
tile, one process vs two (gloo), up to Llama-3.2-1B's configuration (1.24B parameters).

    python -m bench.bench_disk_step [--models llama2m llama111m llama1b] [--runs memory disk disk2]
                                    [--dir DIR] [--ckpt CKPT] [--name disk_step]

For each model: five bfloat16 HF model directories (``config.json`` + ``model.safetensors``: random initial
weights on a straight line with per-snapshot noise; embeddings tied for Llama-3.2-1B's configuration as in the
released model, untied for the others as in ``bench.bench_e2e``) are written to
``DIR/<model>/checkpoint-{100..500}`` (kept and reused when present), then each run is a fresh
``nino-fast step DIR/<model>/checkpoint-* --nino CKPT --k 10`` process:

- ``memory``: ``--history memory`` (the (P, 5) float32 history and the whole graph in memory; skipped when that
  would need more than 80% of the machine's available memory);
- ``disk``: ``--history disk`` (the graph assembled per tile, the history read from the files per tile);
- ``disk2``: the same under ``torchrun --standalone --nproc-per-node 2`` (one thread per process).

Figures per run: wall time of the command, each process's peak RSS (its own ``ru_maxrss``, printed by the CLI),
µs and bytes per edge, and whether the output bytes equal the first run's. The CPU's lscpu family/model are in the
``machine`` record. Results: ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .bench_e2e import DEFAULT_CKPT
from .common import LLAMA, write_results

LLAMA_1B = dict(  # Llama-3.2-1B's configuration (1.236B parameters, tied embeddings)
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
MODELS = {name: LLAMA[name] for name in ("llama251k", "llama2m", "llama111m")} | {"llama1b": LLAMA_1B}
TIED = {"llama1b"}  # the others as in the end-to-end benchmark (untied)
STEPS = (100, 200, 300, 400, 500)
REPO = Path(__file__).resolve().parents[1]


def _config(name: str):
    import transformers

    return transformers.LlamaConfig(
        **MODELS[name], tie_word_embeddings=name in TIED, max_position_embeddings=2048, torch_dtype="bfloat16"
    )


def write_checkpoints(name: str, root: Path) -> list[Path]:
    """Five bf16 HF directories of model ``name`` (reused when complete): ``w_j = w_0 + j * drift + noise_j``."""
    import transformers

    dirs = [root / name / f"checkpoint-{s}" for s in STEPS]
    if all((d / "model.safetensors").is_file() and (d / "config.json").is_file() for d in dirs):
        return dirs
    cfg = _config(name)
    with torch.device("meta"):
        named = [(n, tuple(p.shape)) for n, p in transformers.LlamaForCausalLM(cfg).named_parameters()]
    header, off = {}, 0
    for n, shape in named:
        size = math.prod(shape) * 2
        header[n] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + size]}
        off += size
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    files = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        f = open(d / "model.safetensors.part", "wb")  # noqa: SIM115 (five files open together)
        f.write(len(head).to_bytes(8, "little") + head)
        files.append(f)
    gen = torch.Generator().manual_seed(0)
    for _, shape in named:  # one tensor at a time: memory stays a few of the largest tensor
        w0 = torch.randn(shape, generator=gen) * 0.02
        drift = torch.randn(shape, generator=gen) * 2e-4
        for j, f in enumerate(files):
            w = (w0 + drift * j + torch.randn(shape, generator=gen) * 2e-5).to(torch.bfloat16)
            f.write(memoryview(w.view(torch.uint8).numpy()))
    for f, d in zip(files, dirs, strict=True):
        f.close()
        os.replace(d / "model.safetensors.part", d / "model.safetensors")
    return dirs


def _sizes(name: str) -> tuple[int, int]:
    """(parameters, edges) of the model's graph, from its layout (no edge arrays)."""
    import transformers

    from nino_fast.graph import build_graph_layout

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_config(name))
    layout = build_graph_layout(model, lpe=0)
    return layout.num_params, layout.num_edges


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def run_step(dirs: list[Path], out: Path, ckpt: str, run: str) -> dict:
    """One ``nino-fast step`` command: wall time, each process's peak RSS, the output's digest."""
    args = ["step", *map(str, dirs), "--nino", ckpt, "--k", "10", "--out", str(out), "--no-progress"]
    args += ["--history", "memory" if run == "memory" else "disk"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launch = [sys.executable, "-m", "nino_fast.cli"]
    if run == "disk2":
        env["OMP_NUM_THREADS"] = "1"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        launch += ["-m", "nino_fast.cli"]
    t0 = time.perf_counter()
    res = subprocess.run([*launch, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{run}: exit {res.returncode}\n{res.stdout}\n{res.stderr[-4000:]}")
    peaks = [float(x) * 2**30 for x in re.findall(r"peak memory ([0-9.]+) GiB", res.stdout)]
    return dict(run=run, wall_s=wall, peak_rss=peaks, digest=_digest(out), stdout=res.stdout.strip())


def max_difference(a: Path, b: Path) -> float:
    """Largest |a - b| over the two outputs' tensors, relative to the largest |a| (0.0: the same values)."""
    from nino_fast.offline.files import open_safetensors

    diff = top = 0.0
    for fa in sorted(a.rglob("*.safetensors")):
        ta, tb = open_safetensors(fa), open_safetensors(b / fa.relative_to(a))
        for n in ta.names:
            x, y = ta.read(n).float(), tb.read(n).float()
            diff, top = max(diff, float((x - y).abs().max())), max(top, float(x.abs().max()))
    return diff / top if top else diff


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in out.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama2m", "llama111m", "llama1b"], choices=list(MODELS))
    p.add_argument("--runs", nargs="+", default=["memory", "disk", "disk2"], choices=["memory", "disk", "disk2"])
    p.add_argument("--dir", default="/tmp/nino_disk_step", help="where the checkpoints and outputs are written")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--name", default="disk_step")
    args = p.parse_args(argv)
    root = Path(args.dir)
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        dirs = write_checkpoints(name, root)
        made = time.perf_counter() - t0
        params, edges = _sizes(name)
        first = None
        for run in args.runs:
            if run == "memory" and params * 41 > 0.8 * _available():
                print(f"{name}: memory run skipped ({params * 41 / 1e9:.1f} GB would not fit)", flush=True)
                continue
            r = run_step(dirs, root / name / f"pred-{run}", args.ckpt, run)
            out = root / name / f"pred-{run}"
            first = first or (r["digest"], out)
            row = dict(model=name, params=params, edges=edges, checkpoints_s=made, **r)
            row["same_bytes_as_first_run"] = r["digest"] == first[0]
            # one thread per process under torchrun: torch's own ops (node updates) may round differently
            row["max_rel_difference_to_first_run"] = (
                0.0 if row["same_bytes_as_first_run"] else max_difference(first[1], out)
            )
            row["us_per_edge"] = r["wall_s"] / edges * 1e6
            row["peak_bytes_per_edge"] = [b / edges for b in r["peak_rss"]]
            rows.append(row)
            peaks = " / ".join(f"{b / 2**30:.2f}" for b in r["peak_rss"])
            print(
                f"{name} ({params / 1e6:.1f}M params, {edges / 1e6:.1f}M edges) {run}: {r['wall_s']:.1f} s, "
                f"peak {peaks} GiB, same bytes: {row['same_bytes_as_first_run']} "
                f"(max rel. difference {row['max_rel_difference_to_first_run']:.1e})",
                flush=True,
            )
    path = write_results(args.name, {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
