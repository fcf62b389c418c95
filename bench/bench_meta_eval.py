"""The bundled checkpoints vs AdamW, Linefit+ and WNN+ with the demo's protocol, on held-out vision and language tasks.

    python -m bench.bench_meta_eval [--ckpt nino_fast/checkpoints/nino_fast_small.pt] [--seeds 3] [--steps N]
                                    [--period N] [--tasks demo heldout lm-gpt2 lm-llama] [--official] [--default]

Protocol (:mod:`nino_fast.demo`'s, per task and seed; every run starts from the same initialisation and sees the
same mini-batches): AdamW (lr 3e-3, weight decay 0.01, batch 64, constant lr) for ``steps`` steps, alone and
wrapped in ``NiNo(AdamW, period=200)`` with each predictor; validation loss every 20 steps; target = AdamW's
final validation loss (mean of its last 5 evaluations); steps to target = first evaluated step at or below it;
saved = 1 - steps(predictor) / steps(AdamW).

Tasks (none is in the meta-training data, see :mod:`nino_fast.meta.tasks`):

- ``demo``: the demo's ConvNet (width 16, depth 3) on sklearn digits — run through ``nino_fast.demo.train``;
- ``heldout``: an MLP 64-128-128-128-10 on the same digits (deeper and wider than any MLP in training) at AdamW
  lr 3e-4 (below the training range; at 3e-3 it overfits within 200 steps), run by ``demo.train`` with that
  model;
- ``lm-gpt2`` / ``lm-llama``: :data:`nino_fast.meta.tasks.HELDOUT_LM_TASKS`, character-level language models of
  a width no training run has, on texts no training run saw (a GPT-2 on the standard library's English help
  topics, a grouped-query Llama on unseen sources), run by :func:`nino_fast.demo.train_lm`: AdamW lr 1e-3,
  16 windows of 64 characters, 1,000 steps, ``NiNo(AdamW, period=100)``; validation on 32 windows of the text's
  last tenth.

Predictors: ``ours`` (``--ckpt``), ``linefit+``, ``wnn+`` (``../shared/checkpoints/nino_mlp.pt``), and with
``--official`` the official NiNo ``nino_no_posw.pt`` for reference, with ``--default`` ``NiNo(...)`` without a
``ckpt`` (the bundled checkpoint it selects for the model's architecture). Results: bench/results/meta_eval.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from nino_fast import demo
from nino_fast.meta import tasks

from .common import write_results

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "checkpoints"
DEFAULT_CKPT = ROOT / "nino_fast" / "checkpoints" / "nino_fast_small.pt"


def heldout_model():
    return tasks.build_model({**tasks.HELDOUT_TASK, "seed": 0})


VISION_TASKS = ("demo", "heldout")
TASKS = VISION_TASKS + tuple(tasks.HELDOUT_LM_TASKS)


def protocol(task: str, steps: int | None, period: int | None) -> tuple[int, int]:
    """(steps, period) of ``task``: the given ones, else 2,000 / 200 (vision) or 1,000 / 100 (language)."""
    lm = task in tasks.HELDOUT_LM_TASKS
    default = (demo.LM_DEFAULTS["steps"], demo.LM_DEFAULTS["period"]) if lm else (2000, 200)
    return steps or default[0], period or default[1]


def run(task: str, data, seed: int, steps: int, lr: float, ckpt, period: int) -> dict:
    """One run of ``task``; ``lr`` is the demo's (the held-out tasks have their own: ``HELDOUT_TASK['lr']``,
    ``demo.LM_DEFAULTS['lr']``)."""
    if task in tasks.HELDOUT_LM_TASKS:
        return demo.train_lm(
            tasks.HELDOUT_LM_TASKS[task], seed, steps, demo.LM_DEFAULTS["lr"], ckpt=ckpt, period=period
        )
    if task == "demo":
        return demo.train(data, seed, steps, lr, ckpt=ckpt, period=period)
    return demo.train(data, seed, steps, tasks.HELDOUT_TASK["lr"], ckpt=ckpt, period=period, model_fn=heldout_model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help="steps per run (default: 2000 vision, 1000 language)")
    p.add_argument("--period", type=int, help="NiNo period (default: 200 vision, 100 language)")
    p.add_argument("--lr", type=float, default=3e-3, help="the demo task's learning rate")
    p.add_argument("--tasks", nargs="+", default=["demo", "heldout"], choices=TASKS)
    p.add_argument("--official", action="store_true", help="also the official nino_no_posw.pt (reference)")
    p.add_argument("--predictors", nargs="+", help="only these (ours, default, linefit+, wnn+, official)")
    p.add_argument("--default", action="store_true", help="also the wrapper's default checkpoint (no ckpt)")
    p.add_argument("--candidates", nargs="+", default=[], metavar="NAME=PATH", help="more checkpoints to compare")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="meta_eval", help="results name under bench/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictors = {"ours": args.ckpt, "linefit+": "linefit+", "wnn+": str(SHARED / "nino_mlp.pt")}
    if args.official:
        predictors["official"] = str(SHARED / "nino_no_posw.pt")
    if args.default:
        predictors["default"] = None  # NiNo(...) without ckpt: the bundled checkpoint it picks for the model
    for item in args.candidates:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--candidates takes NAME=PATH, got {item!r}")
        predictors[name] = path
    if args.predictors:
        predictors = {k: v for k, v in predictors.items() if k in args.predictors}
    data = demo.load_digits_split()
    rows, summary = [], {}
    for task in args.tasks:
        steps, period = protocol(task, args.steps, args.period)
        for seed in range(args.seeds):
            base = run(task, data, seed, steps, args.lr, "none", period)
            target = demo.target_loss(base)
            sb = demo.steps_to(base, target)
            row = dict(
                task=task,
                seed=seed,
                steps=steps,
                period=period,
                target=target,
                steps_adamw=sb,
                final_loss_adamw=base["val_loss"][-1],
            )
            for name, ckpt in predictors.items():
                log = run(task, data, seed, steps, args.lr, ckpt, period)
                sn = demo.steps_to(log, target)
                row[name] = dict(
                    steps=sn,
                    saved_pct=demo.saved_pct(sb, sn),
                    final_loss=log["val_loss"][-1],
                    final_acc=log["val_acc"][-1] if "val_acc" in log else None,
                    best_loss=min(log["val_loss"]),
                )
            rows.append(row)
            print(
                f"{task} seed {seed}: AdamW {sb} steps to {target:.4f}; "
                + ", ".join(f"{n} {row[n]['steps']}" for n in predictors),
                flush=True,
            )
        for name in predictors:
            mine = [r[name] for r in rows if r["task"] == task]
            saved = [m["saved_pct"] for m in mine if m["saved_pct"] is not None]
            summary[f"{task}/{name}"] = dict(
                reached=f"{len(saved)}/{len(mine)}",
                mean_saved_pct=statistics.mean(saved) if len(saved) == len(mine) else None,
                saved_pct=[m["saved_pct"] for m in mine],
                mean_final_loss=statistics.mean(m["final_loss"] for m in mine),
            )
        adamw = [r["final_loss_adamw"] for r in rows if r["task"] == task]
        summary[f"{task}/adamw"] = dict(mean_final_loss=statistics.mean(adamw))
    print(f"\n{'task/predictor':24s} {'reached':>8s} {'mean saved':>11s}  per seed")
    for key, s in summary.items():
        if "reached" in s:
            mean = "-" if s["mean_saved_pct"] is None else f"{s['mean_saved_pct']:.1f}%"
            per = ", ".join("-" if v is None else f"{v:.0f}%" for v in s["saved_pct"])
            print(f"{key:24s} {s['reached']:>8s} {mean:>11s}  {per}")
    path = write_results(args.out, dict(args=vars(args), predictors=predictors, summary=summary, rows=rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
