"""Metanetwork training throughput (graphs/s, forward + backward): :class:`nino_fast.metanet.MetaNet` on the fused
layers vs the same model on PyG ``MessagePassing`` layers (bench/pyg_ref.py), same weights, same batches.

    python -m bench.bench_metanet [--batch 32] [--batches 4] [--hid 128] [--edge-dim 16] [--layers 3] [--threads 1]

A batch is ``--batch`` zoo architectures (``nino_fast.metanet.zoo.sample_spec``: MLPs and ConvNets, with and
without BatchNorm; untrained weights: the speed does not depend on the values) in one block-diagonal graph. One
step = forward, MSE loss on the graph-level predictions, backward to every weight (``zero_grad`` included);
both models are first checked to give the same predictions and gradients. Median over repeats, per batch, the
two models alternating on each batch; the batch is collated once, outside the timed step (``collate_s``: its
time, the same for both). Results: bench/results/metanet_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from nino_fast.metanet import MetaNet, collate, graph_input
from nino_fast.metanet.zoo import build_model, sample_spec

from .common import timeit, write_results
from .pyg_ref import pyg_like


def metanet_pyg(net: MetaNet) -> MetaNet:
    """The same metanetwork with every ``nino_fast.nn`` layer replaced by its PyG version (same weights)."""
    out = copy.deepcopy(net)
    out.convs = torch.nn.ModuleList(pyg_like(c) for c in net.convs)
    out.updates = torch.nn.ModuleList(pyg_like(u) for u in net.updates)
    out.graph_input = "edge_index"
    return out


def batches(n_batches: int, batch: int, max_feat_size: int, seed: int = 0) -> list:
    """``n_batches`` lists of ``batch`` graph inputs (zoo architectures) each."""
    out = []
    for b in range(n_batches):
        models = []
        for i in range(batch):
            torch.manual_seed(b * batch + i)
            models.append(build_model(sample_spec(seed, b * batch + i)))
        out.append([graph_input(m, max_feat_size) for m in models])
    return out


def step(net: MetaNet, batch, target: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(net.forward_standardized(batch), target)
    loss.backward()


def check_same(ours: MetaNet, pyg: MetaNet, batch, target) -> float:
    """Largest relative difference of the predictions and weight gradients of the two models."""
    step(ours, batch, target)
    step(pyg, batch, target)
    with torch.no_grad():
        worst = float((ours.forward_standardized(batch) - pyg.forward_standardized(batch)).abs().max())
    named = dict(pyg.named_parameters())
    for name, p in ours.named_parameters():
        q = named[name]
        if p.grad is None and q.grad is None:  # unused by this readout (the attention scores)
            continue
        worst = max(worst, float((p.grad - q.grad).abs().max()) / max(1e-3, float(q.grad.abs().max())))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="graphs per block-diagonal batch")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches timed")
    ap.add_argument("--hid", type=int, default=128)
    ap.add_argument("--edge-dim", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = MetaNet(args.hid, args.edge_dim, args.layers)
    pyg = metanet_pyg(ours)
    data = batches(args.batches, args.batch, ours.max_feat_size)
    rows = []
    for i, inputs in enumerate(data):
        batch = collate(inputs)
        target = torch.randn(batch.num_graphs)
        diff = check_same(ours, pyg, batch, target)
        if diff > 1e-3:
            raise RuntimeError(f"bench_metanet: ours and PyG differ by {diff:.2e} on batch {i}")
        t_ours = timeit(lambda b=batch, t=target: step(ours, b, t), repeat=args.repeat)["median_s"]
        t_pyg = timeit(lambda b=batch, t=target: step(pyg, b, t), repeat=args.repeat)["median_s"]
        t_collate = timeit(lambda x=inputs: collate(x), repeat=args.repeat)["median_s"]
        rows.append(
            {
                "batch": i, "graphs": batch.num_graphs, "nodes": batch.x.shape[0], "edges": batch.edge_attr.shape[0],
                "max_rel_diff": diff, "ours_s": t_ours, "pyg_s": t_pyg, "collate_s": t_collate,
                "ours_graphs_per_s": batch.num_graphs / t_ours, "pyg_graphs_per_s": batch.num_graphs / t_pyg,
                "speedup": t_pyg / t_ours,
            }
        )  # fmt: skip
        print(
            f"batch {i}: {batch.num_graphs} graphs, {batch.x.shape[0]} nodes, {batch.edge_attr.shape[0]} edges: "
            f"ours {batch.num_graphs / t_ours:.1f} graphs/s, PyG {batch.num_graphs / t_pyg:.1f} graphs/s, "
            f"x{t_pyg / t_ours:.2f} (max rel. diff {diff:.1e})",
            flush=True,
        )
    total_ours, total_pyg = sum(r["ours_s"] for r in rows), sum(r["pyg_s"] for r in rows)
    graphs = sum(r["graphs"] for r in rows)
    summary = {
        "ours_graphs_per_s": graphs / total_ours,
        "pyg_graphs_per_s": graphs / total_pyg,
        "speedup": total_pyg / total_ours,
        "median_speedup": statistics.median(r["speedup"] for r in rows),
    }
    print(
        f"all batches: ours {summary['ours_graphs_per_s']:.1f} graphs/s, PyG {summary['pyg_graphs_per_s']:.1f} "
        f"graphs/s: x{summary['speedup']:.2f}"
    )
    path = write_results("metanet_throughput", {"args": vars(args), "summary": summary, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
