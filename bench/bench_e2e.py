"""End-to-end NiNo step on Llama models: wall time and peak RSS, ours vs the official implementation.

    python -m bench.bench_e2e [--models llama251k llama2m] [--impls ours layerwise official]
                              [--official-path PATH_TO_OFFICIAL_NINO_CHECKOUT] [--ckpt CKPT]

- ``ours``: ``build_graph`` (incl. LPE) + ``NiNoModel.nowcast`` with the folded plan on the best backend.
- ``layerwise``: the same on the layer-by-layer path with the reference ops (the official maths, our code).
- ``official``: the official code (PyG; needs ``torch_geometric`` and a checkout of SamsungSAILMontreal/nino given
  by ``--official-path``), given our LPE (its own eigenvector signs are random), timed from graph construction to
  the unscaled prediction, exactly as its ``NiNo.step`` runs it.

Each (model, impl) runs in a fresh process; peak RSS is the process's high-water mark. The predictions of all
implementations are compared (relative max error vs ``official`` or, without it, vs ``layerwise``).
Results: bench/results/e2e_cpu.json (``--name``: another file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import LLAMA, llama_shapes, peak_rss, run_isolated, write_results

MODELS = {k: LLAMA[k] for k in ("llama251k", "llama2m", "llama8m")}  # the configurations the issue names
DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "nino_no_posw.pt"


def named_shapes(name: str):
    """((name, shape) list, heads) of the Llama model ``name``, from ``transformers`` on the meta device."""
    return llama_shapes(name)


def _shapes(model_name: str, out_dir) -> tuple[list, dict]:
    """The shapes written by the parent (workers never import transformers: ~150 MB of RSS that is neither
    implementation's), or computed here when run alone."""
    path = Path(out_dir or ".") / f"{model_name}_shapes.json"
    if not path.exists():
        return named_shapes(model_name)
    named, heads = json.loads(path.read_text())
    return [(n, tuple(s)) for n, s in named], heads


def trajectory(n_params: int, ctx: int = 5, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic history: initial values plus a drift and noise per step, (n_params, ctx)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n_params, 1, generator=gen) * 0.02
    drift = torch.randn(n_params, 1, generator=gen) * 1e-3
    noise = torch.randn(n_params, ctx, generator=gen).cumsum(1) * 2e-4
    return p0 + drift * torch.arange(ctx) + noise


def run_ours(model_name, ckpt, k, out_dir, layerwise=False, warm=0):
    from nino_fast import NiNoModel, build_graph

    named, heads = _shapes(model_name, out_dir)
    states = trajectory(sum(torch.Size(s).numel() for _, s in named))
    t0 = time.perf_counter()
    graph = build_graph(named, arch="llama", lpe=8, **heads)
    t_graph = time.perf_counter() - t0
    nino = NiNoModel.from_checkpoint(ckpt)
    times = []  # the first step, then the same step again: what a training run's later NiNo steps cost
    for _ in range(1 + warm):
        t1 = time.perf_counter()
        pred = nino.nowcast(graph, states, k, backend="reference" if layerwise else None, fused=not layerwise)
        times.append(time.perf_counter() - t1)
    t_step, again = times[0], times[1:]
    torch.save(pred, Path(out_dir) / f"{model_name}_{'layerwise' if layerwise else 'ours'}.pt")
    if not layerwise:
        torch.save(graph.lpe, Path(out_dir) / f"{model_name}_lpe.pt")
    res = dict(graph_s=t_graph, step_s=t_step, params=graph.num_params, edges=graph.num_edges, nodes=graph.num_nodes)
    if again:
        res["step_again_s"] = sorted(again)[len(again) // 2]
    return res


def run_official(model_name, ckpt, k, out_dir, official_path):
    """The official pipeline (graph, scaling, PyG model, to_vector, unscaling), given our LPE."""
    import contextlib
    import io

    named, heads = _shapes(model_name, out_dir)
    sys.path.insert(0, official_path)
    try:  # the official optim package imports torchvision, which only its optimizer wrapper uses
        import torchvision  # noqa: F401
    except ImportError:
        import importlib.machinery
        import types

        stub = types.ModuleType("torchvision")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        sys.modules["torchvision"] = stub
    from graph import NeuralGraphLlama  # noqa: E402  (the official package layout)
    from optim.model import NiNoModel as OfficialNiNo  # noqa: E402
    from utils import scale_params, unscale_params  # noqa: E402

    model_dict = [(n, torch.Size(s)) for n, s in named]
    states = trajectory(sum(torch.Size(s).numel() for _, s in named))
    lpe = torch.load(Path(out_dir) / f"{model_name}_lpe.pt")
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        graph = NeuralGraphLlama(
            model_dict,
            lpe=lpe,
            num_heads=heads["num_heads"],
            num_key_value_heads=heads["num_key_value_heads"],
            verbose=False,
        )
    t_graph = time.perf_counter() - t0
    meta = OfficialNiNo(**sd.get("model_args", {})).eval()
    meta.load_state_dict(sd["state_dict"])
    t1 = time.perf_counter()
    with torch.no_grad():
        x, scales = scale_params(states.clone(), model_dict, method=meta.scale_method)
        graph.set_edge_attr(x)
        graph.pyg_graph = meta(graph.pyg_graph, k=k)
        pred = unscale_params(graph.to_vector(), model_dict, scales, method=meta.scale_method).flatten()
    t_step = time.perf_counter() - t1
    torch.save(pred, Path(out_dir) / f"{model_name}_official.pt")
    return dict(graph_s=t_graph, step_s=t_step)


def worker(args):
    if args.worker == "official":
        res = run_official(args.model, args.ckpt, args.k, args.out_dir, args.official_path)
    else:
        res = run_ours(args.model, args.ckpt, args.k, args.out_dir, args.worker == "layerwise", args.again)
    res.update(impl=args.worker, model=args.model, peak_rss_bytes=peak_rss(), total_s=res["graph_s"] + res["step_s"])
    print(json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama251k", "llama2m"], choices=list(MODELS))
    p.add_argument("--impls", nargs="+", default=["ours", "layerwise", "official"])
    p.add_argument("--official-path", default=os.environ.get("NINO_OFFICIAL_PATH"))
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--worker")
    p.add_argument("--model")
    p.add_argument("--out-dir")
    p.add_argument(
        "--again",
        type=int,
        default=0,
        help="ours/layerwise: time the step this many more times in the same process (median reported as "
        "step_again_s; the first step of a fresh process also pays the machine's warm-up)",
    )
    p.add_argument("--name", default="e2e_cpu", help="results file bench/results/NAME.json (earlier runs are cited)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    impls = [i for i in args.impls if i != "official" or args.official_path]
    if "official" in args.impls and not args.official_path:
        print("# official: skipped (give --official-path or NINO_OFFICIAL_PATH)", file=sys.stderr)
    impls = ["ours"] + [i for i in impls if i != "ours"]  # ours first: it writes the LPE the others use
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            (Path(tmp) / f"{model}_shapes.json").write_text(json.dumps(named_shapes(model)))
            preds = {}
            for impl in impls:
                extra = ["--official-path", args.official_path] if impl == "official" else ["--again", str(args.again)]
                r = run_isolated(
                    "bench.bench_e2e",
                    [
                        "--worker",
                        impl,
                        "--model",
                        model,
                        "--out-dir",
                        tmp,
                        "--ckpt",
                        args.ckpt,
                        "--k",
                        str(args.k),
                        *extra,
                    ],
                )
                preds[impl] = torch.load(Path(tmp) / f"{model}_{impl}.pt")
                rows.append(r)
                again = f"  (again: {r['step_again_s']:.2f} s)" if "step_again_s" in r else ""
                print(
                    f"{model:10s} {impl:10s} graph {r['graph_s']:8.2f} s  step {r['step_s']:8.2f} s  "
                    f"total {r['total_s']:8.2f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB{again}",
                    flush=True,
                )
            base = "official" if "official" in preds else "layerwise" if "layerwise" in preds else None
            for impl, pred in preds.items():
                if base and impl != base:
                    err = ((pred - preds[base]).abs().max() / preds[base].abs().max()).item()
                    next(r for r in rows if r["model"] == model and r["impl"] == impl)[f"rel_err_vs_{base}"] = err
                    print(f"{model:10s} {impl:10s} max rel error vs {base}: {err:.2e}")
    path = write_results(args.name, {"k": args.k, "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
