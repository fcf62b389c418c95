"""``nino-fast`` command line. ``nino-fast info``: versions, the compiled extension and the available
backends. ``nino-fast step``: one NiNo step on saved model checkpoints (see :mod:`nino_fast.offline`).
``nino-fast collect`` / ``nino-fast train``: meta-training (see :mod:`nino_fast.meta`). ``nino-fast metanet
zoo|train|eval``: metanetworks predicting a model's test accuracy from its weights (see :mod:`nino_fast.metanet`).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from ._args import NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT
from .meta.cli import add_parsers as add_meta_parsers
from .metanet.cli import add_parsers as add_metanet_parsers


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # not installed, or broken: report, never fail `info`
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


def info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, _extension
    from .ops import dispatch

    rows = [
        ("nino_fast", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("triton", _version("triton")),
        ("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        ("extension", "loaded" if _extension.has_ext() else f"not loaded: {_extension.ext_error()}"),
        ("extension CUDA kernels", "compiled" if _extension.has_cuda_ext() else "not compiled"),
        ("backends (cpu)", ", ".join(dispatch.available_backends("cpu"))),
    ]
    if torch.cuda.is_available():
        rows.append(("backends (cuda)", ", ".join(dispatch.available_backends("cuda"))))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def step(args: argparse.Namespace) -> int:
    import logging

    from .offline import StepError, nowcast_checkpoints

    logging.basicConfig(level=logging.WARNING, format="nino-fast step: %(levelname)s: %(message)s")
    logging.getLogger("nino_fast.offline").setLevel(logging.INFO)  # e.g. "snapshots reordered by step number"
    try:
        summary = nowcast_checkpoints(
            args.ckpts,
            args.out,
            args.nino,
            k=args.k,
            period=args.period,
            max_train_steps=args.max_train_steps,
            step=args.step,
            k_decay=args.k_decay,
            arch=args.arch,
            num_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads,
            exclude=args.exclude,
            device=args.device,
            config=args.config,
            order_from=args.order_from,
            history=args.history,
            max_memory=args.max_memory,
            progress=args.progress,
            resume=args.resume,
        )
    except (StepError, ValueError, OSError) as exc:  # user errors: a message, never a traceback
        print(f"nino-fast step: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nino-fast step: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    peak = f", peak memory {summary['peak_rss'] / 2**30:.2f} GiB" if summary.get("peak_rss") else ""
    if summary["ranks"] > 1 and summary["rank"] != 0:
        print(f"rank {summary['rank']}/{summary['ranks']}: its part of the step is done{peak}")
        return 0
    ranks = f" on {summary['ranks']} processes" if summary["ranks"] > 1 else ""
    print(
        f"wrote {summary['out']} ({summary['format']}): {summary['predictor']} step at k={summary['k']} on "
        f"{summary['num_params']} parameters in {summary['num_tensors']} tensors (history in {summary['history']}"
        f"{ranks}{peak})"
    )
    return 0


def _add_step_parser(sub) -> None:
    p = sub.add_parser(
        "step",
        help="apply one NiNo step to saved checkpoints (oldest first) and write the prediction",
        description="Apply one NiNo step to ctx saved checkpoints of one training run (torch state dicts, "
        ".safetensors files, Hugging Face model directories, sharded ones included, or sharded .index.json "
        "files), and write the predicted checkpoint in the same format and shard layout. Snapshots whose "
        "names all carry a step number (step_1000.pt, checkpoint-1000) are sorted by it, so a shell glob is "
        "fine; otherwise they are taken oldest first as given. The output is written atomically (an existing "
        "--out is replaced only once the new one is complete) and may not be one of the inputs. Errors exit "
        "with status 2.",
    )
    p.add_argument(
        "ckpts",
        nargs="+",
        metavar="CKPT",
        help="the snapshots (5 for NiNo checkpoints): sorted by the step numbers in their names when all have "
        "one, else oldest first as given",
    )
    p.add_argument("--nino", required=True, help="NiNo checkpoint (.pt), or 'linefit' / 'linefit+'")
    p.add_argument(
        "--out",
        required=True,
        help="output file, or directory for Hugging Face directories and sharded index files (its parent must "
        "exist; an existing --out is replaced atomically)",
    )
    p.add_argument("--k", type=POSITIVE, help="horizon in snapshot spacings (1..40 for NiNo)")
    p.add_argument(
        "--period", type=POSITIVE, help="steps between NiNo steps (k from the schedule, with --max-train-steps)"
    )
    p.add_argument("--max-train-steps", type=NON_NEGATIVE, help="planned training steps, for the k schedule")
    p.add_argument(
        "--step",
        type=NON_NEGATIVE,
        help="optimizer steps done at the last snapshot (default: parsed from its "
        "name, e.g. step_3000 or checkpoint-3000)",
    )
    p.add_argument("--k-decay", type=POSITIVE_FLOAT, default=2.0, help="power of the k schedule (default 2)")
    p.add_argument(
        "--arch",
        help="graph architecture for plain state dicts (generic, gpt2, llama, qwen3, bert, "
        "vit, nanogpt; default generic)",
    )
    p.add_argument("--num-heads", type=POSITIVE, help="attention heads (transformer state dicts)")
    p.add_argument("--num-kv-heads", type=POSITIVE, help="key/value heads (grouped-query attention)")
    p.add_argument("--exclude", help="regex of tensor names to leave unchanged (plain state dicts)")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="Hugging Face config.json (or its directory) of the model, built on the meta device for the "
        "parameter order, architecture, attention heads and tied weights; needed for plain .safetensors files "
        "and shard indexes of models other than a numeric nn.Sequential (default: the HF directory's own)",
    )
    p.add_argument(
        "--order-from",
        metavar="PATH",
        help="parameter order for plain .safetensors files / shard indexes: a torch state dict of the same "
        "model (its tied tensors are kept tied) or a text file with one parameter name per line",
    )
    p.add_argument("--device", default="cpu", help="device for the NiNo model (default cpu; e.g. cuda, cuda:1)")
    p.add_argument(
        "--history",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="where the parameter history is kept: memory (the (params, ctx) float32 history and the whole graph, "
        "~41 bytes per parameter), disk (read from the snapshots tile by tile, the graph assembled per tile: only "
        "the prediction is held, same result), auto (default: disk when memory would take more than half the "
        "available memory)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory for the step's tiles beyond its inputs and output, e.g. 4GB (default: half the available "
        "memory, at most 2 GiB)",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over instead of resuming an interrupted run of the same step (with the history on disk, one "
        "process, a step keeps what its passes finish in OUT.nino-step/ until the prediction is written)",
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="show a progress bar with ETA"
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=step)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nino-fast",
        description="NiNo from the command line: one NiNo step on saved checkpoints (step), meta-training data and "
        "training (collect, train), metanetworks (metanet zoo|train|eval), and what this install can run (info).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and available backends").set_defaults(func=info)
    _add_step_parser(sub)
    add_meta_parsers(sub)  # collect, train
    add_metanet_parsers(sub)  # metanet zoo|train|eval
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("collect", "train"):
        # this process allocates and frees the same large tensors over and over: keep freed blocks for reuse
        # instead of re-faulting fresh pages (~1.8x faster training; process-wide, so only here, never on import)
        from .meta._malloc import keep_freed_memory

        keep_freed_memory()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
