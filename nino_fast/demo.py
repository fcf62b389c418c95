"""``make demo``: one NiNo step on a real model trained on a real dataset, with an official checkpoint.

    python -m nino_fast.demo [--ckpt PATH] [--k 10] [--steps 200] [--seed 0]

Trains a small MLP (64-64-10) on scikit-learn's handwritten digits (8x8 images, shipped with the package: no
network needed) with AdamW, keeps ``ctx = 5`` parameter snapshots (one every ``steps / 5`` steps), applies one
NiNo step at horizon ``k`` and reports the validation loss and accuracy before and after, and the time of the
step. The default checkpoint is ../shared/checkpoints/nino_no_posw.pt beside the checkout. (The full training
loop with and without NiNo, several seeds and the loss-curve plot come with the optimizer wrapper.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import NiNoModel, build_graph

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "nino_no_posw.pt"


def digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the demo extra installs it
        raise SystemExit("the demo needs scikit-learn: pip install 'nino_fast[demo]'") from exc
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def evaluate(model, data):
    with torch.no_grad():
        logits = model(data[0])
        return F.cross_entropy(logits, data[1]).item(), (logits.argmax(1) == data[1]).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="NiNo checkpoint (official format)")
    p.add_argument("--k", type=int, default=10, help="forecast horizon (1..40)")
    p.add_argument("--steps", type=int, default=200, help="AdamW steps before the NiNo step (5 snapshots)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"no NiNo checkpoint at {args.ckpt}: pass --ckpt PATH")
    torch.manual_seed(args.seed)
    train, val = digits(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    nino = NiNoModel.from_checkpoint(args.ckpt)
    graph = build_graph(model, lpe=nino.lpe)
    every = max(1, args.steps // nino.ctx)
    snapshots = []
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train[0]), (64,), generator=gen)
        loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 and len(snapshots) < nino.ctx:
            snapshots.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    before = evaluate(model, val)
    t0 = time.perf_counter()
    new = nino.nowcast(graph, torch.stack(snapshots, 1), args.k)
    elapsed = time.perf_counter() - t0
    torch.nn.utils.vector_to_parameters(new, model.parameters())
    after = evaluate(model, val)
    print(f"model: MLP 64-64-64-10 on sklearn digits, {graph.num_params} parameters, graph {graph}")
    print(f"checkpoint: {args.ckpt}")
    print(f"after {args.steps} AdamW steps: val loss {before[0]:.4f}, acc {before[1]:.3f}")
    print(f"after the NiNo step (k={args.k}, {elapsed * 1e3:.1f} ms): val loss {after[0]:.4f}, acc {after[1]:.3f}")


if __name__ == "__main__":
    main()
