"""``nino-fast metanet zoo|train|eval``: build a model zoo, train a metanetwork on it, score it against StatNN
(registered by :func:`add_parsers` from :mod:`nino_fast.cli`)."""

from __future__ import annotations

import argparse
import json
import sys

from .._args import NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT


def _zoo(args: argparse.Namespace) -> int:
    from .zoo import accuracy_spread, build_zoo, load_zoo

    root = build_zoo(args.out, size=args.size, seed=args.seed, threads=args.threads, progress=not args.quiet)
    spread = accuracy_spread(load_zoo(root))
    print(
        f"zoo {root}: {spread['n']} models, test accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in spread.items() if k != "n")
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train_metanet

    cfg = TrainConfig(
        hid=args.hid, edge_dim=args.edge_dim, layers=args.layers, pool=args.pool, epochs=args.epochs,
        batch=args.batch, lr=args.lr, wd=args.wd, seed=args.seed, threads=args.threads, rank_weight=args.rank_weight,
    )  # fmt: skip
    net, info = train_metanet(args.zoo, cfg, progress=not args.quiet)
    net.save(args.out, **info)
    print(f"metanet {args.out}: best validation R^2 {info['best_val_r2']:.4f} ({info['seconds']:.0f} s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .model import MetaNet
    from .train import evaluate

    result = evaluate(args.zoo, MetaNet.load(args.model), seed=args.seed, threads=args.threads)
    result.update(model=args.model, zoo=args.zoo)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _run(func):
    """Bad inputs (a missing or empty zoo, a file that is not a metanet) end with a one-line error, status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, TypeError, OSError) as exc:
            print(f"nino-fast metanet {args.metanet_command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_parsers(sub) -> None:
    """Register ``metanet`` (with ``zoo``, ``train``, ``eval``) on the ``nino-fast`` subparsers object ``sub``."""
    top = sub.add_parser(
        "metanet",
        help="metanetworks: predict a trained model's test accuracy from its weights",
        description="Graph metanetworks (NG-GNN / GMN style) on the fused kernels: build a zoo of trained models, "
        "train a metanetwork on it, evaluate it against the StatNN baseline.",
    )
    msub = top.add_subparsers(dest="metanet_command", required=True)

    p = msub.add_parser(
        "zoo",
        help="train a zoo of small MLPs and ConvNets on sklearn digits",
        description="Train --size MLPs and ConvNets (BatchNorm or not) on sklearn's digits with varied widths, "
        "depths, activations, optimizers, learning rates, weight decay, training lengths, label noise and seeds; "
        "store each model's weights and held-out test accuracy. Resumable: rerun to continue.",
    )
    p.add_argument("--out", required=True, help="zoo directory (created; an existing zoo is continued)")
    p.add_argument("--size", type=POSITIVE, default=1500, help="number of models (default 1500, ~10 min on one core)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (model i is a function of seed and i)")
    p.add_argument("--threads", type=POSITIVE, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run(_zoo))

    p = msub.add_parser(
        "train",
        help="train a metanetwork on a zoo's train split",
        description="Regress the zoo models' test accuracies from their weights (MSE on standardised targets plus a "
        "pairwise ranking term, AdamW, one-cycle schedule); keep the epoch with the best validation R^2.",
    )
    p.add_argument("--zoo", required=True, help="zoo directory made by `nino-fast metanet zoo`")
    p.add_argument("--out", required=True, help="metanet checkpoint to write (MetaNet.load reads it)")
    p.add_argument("--hid", type=POSITIVE, default=128, help="node channels")
    p.add_argument("--edge-dim", type=POSITIVE, default=16, help="edge channels")
    p.add_argument("--layers", type=POSITIVE, default=3)
    p.add_argument("--pool", choices=("mean", "sum", "attention"), default="mean")
    p.add_argument("--epochs", type=POSITIVE, default=40)
    p.add_argument("--batch", type=POSITIVE, default=32, help="graphs per step (one block-diagonal batch)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=2e-3)
    p.add_argument("--wd", type=NON_NEGATIVE_FLOAT, default=1e-4)
    p.add_argument(
        "--rank-weight", type=NON_NEGATIVE_FLOAT, default=1.0, help="weight of the pairwise ranking term beside the MSE"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=POSITIVE, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run(_train))

    p = msub.add_parser(
        "eval",
        help="score a metanetwork and StatNN on a zoo's test split",
        description="R^2 and Kendall's tau on the test split, of the metanetwork and of StatNN (weight "
        "statistics + gradient-boosted trees, fitted on the train split); JSON to --out and stdout.",
    )
    p.add_argument("--zoo", required=True)
    p.add_argument("--model", required=True, help="metanet checkpoint from `nino-fast metanet train`")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="StatNN's seed")
    p.add_argument("--threads", type=POSITIVE, default=1)
    p.set_defaults(func=_run(_eval))
