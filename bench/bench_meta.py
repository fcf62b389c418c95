"""Meta-training throughput: graphs/s of one training step (forward, loss, backward) per forward path.

    python -m bench.bench_meta [--hids 32 64 128] [--batch 4] [--spt 4] [--repeat 5] [--threads 1]

Paths (:mod:`nino_fast.meta.forward`): ``folded`` (fused kernels forward + fused backward kernels,
nino_fast.ops.backward), ``folded-formulas`` (the same forward, the backward as the PyTorch formulas of
nino_fast.ops.backward instead of the fused CPU backward kernels), ``layerwise`` (the same ops, official layer
order), ``oracle`` (the reference ops under plain autograd: what training the official model costs without our
kernels). Batches are those of
``nino-fast train``: ``batch`` trajectories x ``spt`` windows of the meta-training plan's architectures (MLPs and
ConvNets on digits; random-walk parameter values, which do not change the cost). Before timing, every path's loss
and gradients are checked against the oracle's. Memory: the bytes autograd keeps for the backward pass (tensors
saved by the forward, counted once each through ``saved_tensors_hooks``), the training memory that the path
controls; peak RSS is too noisy a measure on a shared machine with a caching allocator.
Results: bench/results/meta_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nino_fast import NiNoModel
from nino_fast.meta import tasks
from nino_fast.meta._malloc import keep_freed_memory
from nino_fast.meta.data import graph_info, make_batch
from nino_fast.meta.forward import loss_fn, predict_pieces
from nino_fast.ops.backward import fused_backward
from nino_fast.scaling import scale_params

from .common import write_results


def synthetic_batches(n_batches: int, batch: int, spt: int, ctx: int = 5, K: int = 40, seed: int = 0):
    """Batches like the trainer's, on the plan's first architectures, with random-walk histories."""
    gen = torch.Generator().manual_seed(seed)
    specs, seen = [], set()
    for spec in tasks.default_plan():
        key = tasks.task_id({**spec, "lr": 0, "wd": 0, "seed": 0, "opt": "-", "act": "-"})
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    infos = [graph_info(tasks.named_shapes(s)) for s in specs]
    out = []
    for i in range(n_batches):
        samples = []
        for j in range(batch):
            info = infos[(i * batch + j) % len(infos)]
            P = info.graph.num_params
            walk = (torch.randn(P, ctx + K, generator=gen) * 0.01).cumsum(1) + torch.randn(P, 1, generator=gen)
            for _ in range(spt):
                xs, _ = scale_params(walk[:, :ctx], info.graph.param_shapes)
                target = torch.randn(P, K, generator=gen) * 0.1
                signs = torch.ones(1, info.graph.lpe.shape[1])
                samples.append((info, signs, xs, target))
        out.append(make_batch(samples, ctx, K))
    return out


FORMULAS = "-formulas"  # suffix: the path with the backward formulas instead of the fused backward kernels
BENCH_PATHS = ("folded", "folded" + FORMULAS, "layerwise", "oracle")


def step(model, b, path):
    base = path.removesuffix(FORMULAS)
    with fused_backward(not path.endswith(FORMULAS)):
        loss = loss_fn(predict_pieces(model, b, base), b)
        model.zero_grad(set_to_none=True)
        loss.backward()
    return loss


def saved_bytes(model, b, path) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one step's forward."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(predict_pieces(model, b, path.removesuffix(FORMULAS)), b)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for (ptr, _), v in seen.items() if ptr not in params)


def check(model, b) -> dict:
    """Max relative error of each path's loss and gradients vs the oracle's."""
    res, ref = {}, None
    for path in ("oracle", *[p for p in BENCH_PATHS if p != "oracle"]):
        loss = step(model, b, path).item()
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        if ref is None:
            ref = (loss, grads)
            continue
        gerr = max(
            ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item() for g, r in zip(grads, ref[1], strict=True)
        )
        res[path] = dict(loss_rel_err=abs(loss - ref[0]) / abs(ref[0]), grad_max_rel_err=gerr)
        assert res[path]["loss_rel_err"] < 1e-4 and gerr < 1e-3, (path, res[path])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hids", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--spt", type=int, default=4)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--repeat", type=int, default=3, help="passes over the batches")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paths", nargs="+", default=list(BENCH_PATHS), choices=BENCH_PATHS)
    p.add_argument(
        "--fresh-pages",
        action="store_true",
        help="leave glibc's malloc as it is (by default freed blocks are kept for reuse, as `nino-fast train` does)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = False if args.fresh_pages else keep_freed_memory()
    batches = synthetic_batches(args.batches, args.batch, args.spt)
    graphs = sum(b.num_graphs for b in batches)
    edges = sum(b.num_edges for b in batches)
    params = sum(b.target.shape[0] for b in batches)
    print(
        f"{len(batches)} batches of {args.batch}x{args.spt} graphs: {edges / len(batches):.0f} edges, "
        f"{params / len(batches):.0f} parameters per batch on average"
    )
    rows = []
    for hid in args.hids:
        torch.manual_seed(0)
        model = NiNoModel(hid=hid, wte_pos_enc=False).train()
        for prm in model.parameters():  # the official init is tiny (std 0.02): widen it so that errors would show
            prm.data.mul_(10)
        errs = check(model, batches[0])
        for path in args.paths:
            step(model, batches[0], path)  # warm-up
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for b in batches:
                    step(model, b, path)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            row = dict(
                hid=hid,
                path=path,
                seconds_per_pass=med,
                graphs_per_s=graphs / med,
                ms_per_step=1e3 * med / len(batches),
                saved_for_backward_mib=statistics.mean(saved_bytes(model, b, path) for b in batches) / 2**20,
                **({"check_vs_oracle": errs[path]} if path in errs else {}),
            )
            rows.append(row)
            print(
                f"hid {hid:4d} {path:10s} {row['graphs_per_s']:7.1f} graphs/s  {row['ms_per_step']:8.1f} ms/step  "
                f"{row['saved_for_backward_mib']:.0f} MiB saved for backward"
            )
        by = {r["path"]: r for r in rows if r["hid"] == hid}
        if "oracle" in by:
            for path in by:
                by[path]["speedup_vs_oracle"] = by["oracle"]["seconds_per_pass"] / by[path]["seconds_per_pass"]
    path = write_results(
        "meta_cpu",
        dict(
            batch=args.batch,
            samples_per_traj=args.spt,
            keep_freed_memory=kept,
            edges_per_batch=edges / len(batches),
            params_per_batch=params / len(batches),
            rows=rows,
        ),
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
