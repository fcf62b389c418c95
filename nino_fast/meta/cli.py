"""``nino-fast collect`` and ``nino-fast train``: the meta-training subcommands (registered by
:func:`add_parsers` from :mod:`nino_fast.cli`)."""

from __future__ import annotations

import argparse
import sys

from .._args import NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT


def _collect(args: argparse.Namespace) -> int:
    from . import tasks
    from .collect import collect

    try:
        plan = tasks.make_plan(
            args.plan, steps=args.steps, save_every=args.save_every, families=args.families, rounds=args.rounds
        )
        collect(
            args.out, plan, budget_min=args.budget_min, max_runs=args.max_runs, dtype=args.dtype, threads=args.threads
        )
    except (ValueError, OSError) as exc:  # a bad plan, an --out that cannot be a store directory
        print(f"nino-fast collect: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    from ..ops import dispatch
    from .train import TrainConfig, train

    if args.backend is not None and args.backend not in dispatch.BACKENDS:
        print(
            f"nino-fast train: error: --backend {args.backend!r} is not available here (available: "
            f"{', '.join(dispatch.BACKENDS)})",
            file=sys.stderr,
        )
        return 2

    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        hid=args.hid,
        steps=args.steps,
        batch=args.batch,
        samples_per_traj=args.samples_per_traj,
        lr=args.lr,
        wd=args.wd,
        grad_clip=args.grad_clip,
        stride_steps=args.stride_steps,
        seed=args.seed,
        path=args.path,
        backend=args.backend,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        stop_at=args.stop_at,
        max_minutes=args.max_minutes,
        threads=args.threads,
        init=args.init,
        arch=args.arch,
        init_from=args.init_from,
        wte_pos_enc=args.wte_pos_enc,
        vocab_size=args.vocab_size,
        max_params=args.max_params,
    )
    try:
        train(cfg)
    except (ValueError, OSError) as exc:
        print(f"nino-fast train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_parsers(sub) -> None:
    """Register ``collect`` and ``train`` on the ``nino-fast`` subparsers object ``sub``."""
    from .tasks import FAMILIES, PLANS  # (the nino_fast package has imported torch already: cheap)

    p = sub.add_parser(
        "collect",
        help="train small models and store their parameter trajectories (meta-training data)",
        description="Train the meta-training plan's small models (MLPs, ConvNets on sklearn digits; with --plan "
        "wide also character-level GPT-2/Llama transformers on Python standard-library source) and store "
        "parameter snapshots (memory-mapped float16 + JSON manifest). Resumable: rerun to continue.",
    )
    p.add_argument(
        "--plan",
        choices=tuple(PLANS),
        default="default",
        help="default: ConvNets + MLPs, lr 1e-3..5e-3; wide: more MLP depths/widths, lr 1e-4..5e-3, and "
        "transformers (at steps/2); slow: deep and wide MLPs at lr 1e-4..1e-3; lm: character-level GPT-2 and "
        "Llama models (widths 32-256, 2-6 blocks) on standard-library sources, in rounds of 9 runs",
    )
    p.add_argument("--rounds", type=POSITIVE, help="rounds of the lm plan (default 3; more rounds: new seeds)")
    p.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        help="only the plan's runs of these model families (default: all of them)",
    )
    p.add_argument("--out", required=True, help="store directory (created; an existing store is continued)")
    p.add_argument("--budget-min", type=POSITIVE_FLOAT, help="stop starting new runs after this many minutes")
    p.add_argument("--max-runs", type=NON_NEGATIVE, help="only the first N runs of the plan")
    p.add_argument("--steps", type=POSITIVE, default=2400, help="optimizer steps per run (default 2400)")
    p.add_argument("--save-every", type=POSITIVE, default=20, help="steps between snapshots (default 20)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--threads", type=POSITIVE, default=1)
    p.set_defaults(func=_collect)

    p = sub.add_parser(
        "train",
        help="meta-train a NiNo model (GNN or WNN+ MLP) on collected trajectories",
        description="Fit a NiNoModel (official GNN architecture, or with --arch wnn the WNN+ MLP) on a trajectory "
        "store with the paper's loss (mean L1 of the scaled parameter deltas over horizons 1..K), AdamW + cosine "
        "decay, gradient clipping, NaN-safe; resumable (rerun the same command).",
    )
    p.add_argument("--data", required=True, help="trajectory store made by `nino-fast collect`")
    p.add_argument("--out", required=True, help="checkpoint to write (NiNoModel.from_checkpoint format)")
    p.add_argument(
        "--arch", choices=("nino", "wnn"), default="nino", help="nino: the GNN; wnn: the WNN+ per-parameter MLP"
    )
    p.add_argument("--hid", type=POSITIVE, default=64, help="hidden width of the GNN or MLP (official: 128)")
    p.add_argument("--steps", type=POSITIVE, default=2000)
    p.add_argument("--batch", type=POSITIVE, default=4, help="trajectories per step")
    p.add_argument("--samples-per-traj", type=POSITIVE, default=4, help="windows per trajectory (shifted by one)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3)
    p.add_argument("--wd", type=NON_NEGATIVE_FLOAT, default=1e-2)
    p.add_argument("--grad-clip", type=POSITIVE_FLOAT, default=5.0)
    p.add_argument("--stride-steps", type=POSITIVE, default=40, help="optimizer steps between input states")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--path", choices=("folded", "layerwise", "oracle"), default="folded", help="GNN forward path (not for wnn)"
    )
    p.add_argument("--backend", help="kernel backend for the fused ops (default: best available)")
    p.add_argument("--ckpt-every", type=POSITIVE, default=50, help="steps between resumable checkpoints")
    p.add_argument("--log-every", type=POSITIVE, default=25)
    p.add_argument(
        "--max-minutes", type=POSITIVE_FLOAT, help="stop (resumably) after this many minutes of CPU time in all"
    )
    p.add_argument("--stop-at", type=POSITIVE, help="stop (resumably) after this many steps")
    p.add_argument("--init", choices=("official", "torch"), default="official", help="initialisation")
    p.add_argument(
        "--wte-pos-enc",
        action="store_true",
        help="the paper's positional weighting of word-embedding rows (the official nino.pt variant)",
    )
    p.add_argument("--vocab-size", type=POSITIVE, default=50257, help="token positions --wte-pos-enc covers")
    p.add_argument("--max-params", type=POSITIVE, help="train only on the store's runs of models this small or smaller")
    p.add_argument(
        "--init-from", help="start from this checkpoint's weights (same --arch/--hid; fine-tuning) instead of --init"
    )
    p.add_argument("--threads", type=POSITIVE, default=1)
    p.set_defaults(func=_train)
