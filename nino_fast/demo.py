"""``python -m nino_fast.demo``: a small ConvNet on scikit-learn's handwritten digits, trained with AdamW
alone and with AdamW + NiNo; how many steps does each need to reach the same validation loss?

Why this task. The digits (1,797 8x8 grey images, 10 classes, ``sklearn.datasets.load_digits``) ship inside
scikit-learn: no network beyond the package registry. A 3-layer ConvNet (3x3 kernels, global average pooling,
linear classifier; 14k parameters) is close to the small vision tasks NiNo was meta-trained on (small
ConvNets on FashionMNIST and CIFAR-10, the paper's FM/16 and C10/16) and exercises both conv (9 features per
edge) and linear parts of the neural graph; 2,000 steps take ~30 s per run on one CPU core. (A byte-level
GPT-2 on the standard library's sources was ~2-5x slower per step on this machine: too slow for 3 seeds x 2
runs.)

Protocol (per seed; both runs start from the same initialisation and see the same mini-batches):

- AdamW (lr 3e-3, weight decay 0.01, batch 64, constant learning rate) for 2,000 steps;
- the same wrapped in ``NiNo(AdamW, period=200)``: a snapshot every 40 steps, a NiNo step every 200 steps
  (it replaces that step's AdamW step), horizons from the official k schedule (40 -> 1 over 10 NiNo steps);
- validation loss on a fixed, stratified 20% split every 20 steps;
- target = AdamW's final validation loss (mean of its last 5 evaluations, against single-evaluation noise);
  steps to target = the first evaluated step at or below it (NiNo steps count as steps);
  saved = 1 - NiNo steps / AdamW steps.

Choices. period/steps = 10 NiNo steps per run, the ratio of the paper (period 1000 over 10k steps), so the k
schedule is the official one. lr 3e-3: at 1e-2 AdamW reaches its best validation loss within ~500 of the 2,000
steps and then overfits, so "steps to AdamW's final loss" stops measuring speed; at 3e-3 it still improves at
the end. See the README for what was measured at other learning rates and periods.

The predictor is ``--ckpt`` if given, else ``../shared/checkpoints/nino_no_posw.pt`` beside the repository if
present, else nino_fast's own bundled checkpoint (``nino_fast/checkpoints/nino_fast_small.pt``, meta-trained
by ``nino-fast collect`` + ``nino-fast train``), else the Linefit+ baseline; the demo prints which one it used.
Writes ``demo_loss.png`` (validation loss curves of both runs, all seeds) and ``demo_results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._args import POSITIVE, POSITIVE_FLOAT
from ._env import torch_threads
from .meta import tasks
from .meta.tasks import load_digits_split
from .optim import NiNo

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = REPO.parent / "shared" / "checkpoints" / "nino_no_posw.pt"
BUNDLED_CKPT = Path(__file__).resolve().parent / "checkpoints" / "nino_fast_small.pt"  # ours: nino-fast train


def convnet(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(
    data,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int = 64,
    eval_every: int = 20,
    ckpt="none",
    period: int = 200,
    schedule: str = "constant",
    model_fn=None,
) -> dict:
    """One run (``ckpt="none"``: AdamW alone) of the demo's ConvNet, or of the classifier ``model_fn()`` builds
    (same seeding, batches, evaluation). Returns evaluated steps, validation losses/accuracies, times."""
    x_tr, y_tr, x_va, y_va = data
    torch.manual_seed(seed)
    model = (model_fn or convnet)()
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, steps) if schedule == "cosine" else None
    opt = NiNo(base, model=model, ckpt=ckpt, period=period, max_train_steps=steps)
    batches = torch.Generator().manual_seed(seed)

    def loss_of_step(need_grads: bool) -> torch.Tensor | None:
        idx = torch.randint(len(y_tr), (batch_size,), generator=batches)  # drawn every step: same batches
        return F.cross_entropy(model(x_tr[idx]), y_tr[idx]) if need_grads else None  # NiNo steps need none

    def metrics() -> dict[str, float]:
        loss, acc = evaluate(model, x_va, y_va)
        return {"val_loss": loss, "val_acc": acc}

    return _loop(opt, sched, steps, eval_every, loss_of_step, metrics)


def _loop(opt: NiNo, sched, steps: int, eval_every: int, loss_of_step, metrics) -> dict:
    """The demo's training loop: ``steps`` calls of ``opt.step()`` (the NiNo steps timed), the scheduler after
    each, ``metrics()`` at step 0 and every ``eval_every`` steps. ``loss_of_step(need_grads)``: this step's
    mini-batch loss (called every step, so that every run sees the same batches). Returns the log: ``step``,
    one list per metric, ``wall`` and ``nino_time`` in seconds."""
    log: dict = {"step": [0], **{k: [v] for k, v in metrics().items()}}
    nino_time, t0 = 0.0, time.perf_counter()
    for i in range(steps):
        opt.zero_grad()
        need_grads = opt.need_grads
        loss = loss_of_step(need_grads)
        if need_grads:
            loss.backward()
            opt.step()
        else:
            t1 = time.perf_counter()
            opt.step()
            nino_time += time.perf_counter() - t1
        if sched is not None:
            sched.step()
        if (i + 1) % eval_every == 0:
            log["step"].append(i + 1)
            for k, v in metrics().items():
                log[k].append(v)
    log["wall"] = time.perf_counter() - t0
    log["nino_time"] = nino_time
    return log


LM_TASK = "lm-gpt2"  # the language-model demo: nino_fast.meta.tasks.HELDOUT_LM_TASKS' GPT-2 on the docs text
LM_DEFAULTS = dict(steps=1000, period=100, lr=1e-3, batch_size=16, seq=64)


def train_lm(
    task: dict,
    seed: int,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 16,
    eval_every: int = 20,
    ckpt="none",
    period: int = 100,
    schedule: str = "constant",
) -> dict:
    """One run of a character-level language model (``task``: a spec of :mod:`nino_fast.meta.tasks` without
    its training keys, e.g. ``HELDOUT_LM_TASKS['lm-gpt2']``) with AdamW (weight decay 0.01), alone
    (``ckpt="none"``) or wrapped in NiNo; the validation loss (next-character cross-entropy on 32 evenly spaced
    windows of the text's validation tenth) every ``eval_every`` steps. The same seed gives the same
    initialisation and windows with any ``ckpt``. Returns the log of :func:`train` (no accuracy)."""
    spec = dict(task, opt="adamw", lr=lr, wd=0.01, seed=seed, batch=batch_size, steps=steps)
    spec.setdefault("seq", LM_DEFAULTS["seq"])
    train_loss, val_loss = tasks.task_loop(spec)
    torch.manual_seed(seed)
    model = tasks.build_model(spec)
    base = tasks.make_optimizer(spec, model.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, steps) if schedule == "cosine" else None
    opt = NiNo(base, model=model, ckpt=ckpt, period=period, max_train_steps=steps)
    batches = torch.Generator().manual_seed(seed)

    def metrics() -> dict[str, float]:
        with torch.no_grad():
            return {"val_loss": val_loss(model).item()}

    # the windows are drawn and the loss computed in one call, every step (NiNo's too): the same windows in every run
    return _loop(opt, sched, steps, eval_every, lambda need_grads: train_loss(model, batches), metrics)


def target_loss(log: dict) -> float:
    """The target of a run: its final validation loss, the mean of its last 5 evaluations (against the noise
    of a single one)."""
    return float(np.mean(log["val_loss"][-5:]))


def saved_pct(steps_base: int, steps: int | None) -> float | None:
    """Percent of ``steps_base`` saved by reaching the target in ``steps`` (None: never reached)."""
    return None if steps is None else 100.0 * (1 - steps / steps_base)


def steps_to(log: dict, target: float) -> int | None:
    """First evaluated step with validation loss <= target (None if never)."""
    return next((s for s, v in zip(log["step"], log["val_loss"], strict=True) if v <= target), None)


def plot(runs: list[tuple[dict, dict]], targets: list[float], label: str, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, (base, nino) in enumerate(runs):
        first = s == 0
        ax.plot(base["step"], base["val_loss"], color="tab:blue", alpha=0.7, label="AdamW" if first else None)
        ax.plot(
            nino["step"],
            nino["val_loss"],
            color="tab:orange",
            alpha=0.7,
            label=f"AdamW + {label}" if first else None,
        )
        ax.axhline(targets[s], color="gray", lw=0.6, ls="--", label="target: AdamW's final loss" if first else None)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (cross-entropy)")
    ax.set_title(f"{title or 'sklearn digits, 3-layer ConvNet'}, {len(runs)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_predictor(ckpt: str | None, task: str = "convnet") -> tuple[str, str]:
    """(ckpt argument for NiNo, label to print). The language-model task's default is the checkpoint NiNo picks
    for a transformer by itself (:data:`nino_fast.checkpoints.LM`)."""
    if ckpt is None and task == "lm":
        from .checkpoints import LM

        ckpt = str(LM)
    if ckpt is None:
        if DEFAULT_CKPT.is_file():
            ckpt = str(DEFAULT_CKPT)
        elif BUNDLED_CKPT.is_file():
            print(f"no NiNo checkpoint at {DEFAULT_CKPT}: using nino_fast's own bundled checkpoint (--ckpt PATH)")
            ckpt = str(BUNDLED_CKPT)
        else:
            print(f"no NiNo checkpoint at {DEFAULT_CKPT}: using the Linefit+ baseline instead (--ckpt PATH)")
            ckpt = "linefit+"
    label = (
        "Linefit+"
        if ckpt.lower().replace("plus", "+") == "linefit+"
        else ("Linefit" if ckpt.lower() == "linefit" else f"NiNo ({os.path.basename(ckpt)})")
    )
    return ckpt, label


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nino_fast.demo",
        description="A small model trained with AdamW alone and with AdamW + NiNo (a ConvNet on scikit-learn's "
        "digits, or --task lm a character-level GPT-2): how many steps does each need to reach AdamW's final "
        "validation loss (the mean of its last 5 evaluations)?",
    )
    p.add_argument(
        "--task",
        choices=("convnet", "lm"),
        default="convnet",
        help="convnet: the ConvNet on digits; lm: a character-level GPT-2 on the standard library's help text",
    )
    p.add_argument(
        "--ckpt",
        help="NiNo checkpoint, or 'linefit' / 'linefit+' (default: convnet: ../shared/checkpoints/nino_no_posw.pt "
        "beside the repository, else the bundled one, else linefit+; lm: the bundled language-model checkpoint)",
    )
    p.add_argument("--seeds", type=POSITIVE, default=3)
    p.add_argument("--steps", type=POSITIVE, help="default: 2000 (convnet), 1000 (lm)")
    p.add_argument(
        "--period",
        type=POSITIVE,
        help="steps between NiNo steps, a multiple of 5 (snapshots every period/5); default 200 / 100 (lm)",
    )
    p.add_argument("--lr", type=POSITIVE_FLOAT, help="AdamW's learning rate; default 3e-3 / 1e-3 (lm)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning rate")
    p.add_argument("--eval-every", type=POSITIVE, default=20)
    p.add_argument(
        "--threads",
        type=POSITIVE,
        default=1,
        help="torch threads (1: batches of 64 tiny images, or of 16 x 64 characters, gain little from more)",
    )
    p.add_argument(
        "--out",
        default="demo_out",
        help="directory for demo_loss.png and demo_results.json (--task lm: demo_lm_loss.png, demo_lm_results.json)",
    )
    args = p.parse_args(argv)
    lm = args.task == "lm"
    for name, convnet_default, lm_default in (("steps", 2000, 1000), ("period", 200, 100), ("lr", 3e-3, 1e-3)):
        if getattr(args, name) is None:
            setattr(args, name, lm_default if lm else convnet_default)
    if args.period % 5:
        p.error(f"argument --period: must be a multiple of 5 (NiNo's ctx), got {args.period}")
    if args.period > args.steps:
        p.error(f"argument --period: {args.period} is more than --steps {args.steps}: no NiNo step would happen")
    logging.basicConfig(level=logging.WARNING)
    try:
        with torch_threads(args.threads):  # the caller's thread count is restored after
            return _run(args)
    except (ValueError, OSError) as exc:  # a checkpoint that is not one, an --out that cannot be written
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2


def _task(args):
    """(run(seed, ckpt, period) -> log, description, plot title) of ``args.task``."""
    kw = dict(steps=args.steps, lr=args.lr, eval_every=args.eval_every, schedule=args.schedule)
    if args.task == "lm":
        spec = tasks.HELDOUT_LM_TASKS[LM_TASK]
        text = "the standard library's help topics (pydoc_data)"
        desc = (
            f"task: character-level GPT-2 ({spec['width']} wide, {spec['depth']} blocks) on {text}; AdamW lr "
            f"{args.lr} ({args.schedule}), 16 windows of 64 characters, {args.steps} steps"
        )

        def run(seed, ckpt="none", period=100):
            return train_lm(spec, seed, ckpt=ckpt, period=period, **kw)

        return run, desc, "character-level GPT-2 on Python's help text"
    data = load_digits_split()
    desc = f"task: sklearn digits, ConvNet; AdamW lr {args.lr} ({args.schedule}), batch 64, {args.steps} steps"

    def run(seed, ckpt="none", period=200):
        return train(data, seed, ckpt=ckpt, period=period, **kw)

    return run, desc, "sklearn digits, 3-layer ConvNet"


def _run(args) -> int:
    ckpt, label = pick_predictor(args.ckpt, args.task)
    print(f"predictor: {label} [{ckpt}]")
    t_start = time.perf_counter()
    run, desc, title = _task(args)
    print(f"{desc}; NiNo period {args.period} (a snapshot every {args.period // 5} steps)", flush=True)
    runs, targets, rows = [], [], []
    for seed in range(args.seeds):
        base = run(seed)
        nino = run(seed, ckpt=ckpt, period=args.period)
        target = target_loss(base)
        sb, sn = steps_to(base, target), steps_to(nino, target)
        saved = saved_pct(sb, sn)
        runs.append((base, nino))
        targets.append(target)
        row = dict(
            seed=seed,
            target=target,
            steps_adamw=sb,
            steps_nino=sn,
            saved_pct=saved,
            final_loss_adamw=base["val_loss"][-1],
            final_loss_nino=nino["val_loss"][-1],
            final_acc_adamw=base["val_acc"][-1] if "val_acc" in base else None,
            final_acc_nino=nino["val_acc"][-1] if "val_acc" in nino else None,
            wall_adamw=base["wall"],
            wall_nino=nino["wall"],
            nino_steps_time=nino["nino_time"],
        )
        rows.append(row)
        print(
            f"seed {seed}: target {target:.4f}; steps to target: AdamW {sb}, NiNo "
            + (f"{sn} ({saved:.1f}% fewer)" if sn is not None else "not reached")
            + (
                f"; final val acc {row['final_acc_adamw']:.3f} / {row['final_acc_nino']:.3f}"
                if row["final_acc_adamw"] is not None
                else f"; final val loss {row['final_loss_adamw']:.4f} / {row['final_loss_nino']:.4f}"
            )
            + f"; wall {base['wall']:.1f}s / {nino['wall']:.1f}s",
            flush=True,
        )

    print(f"\n{'seed':>4} {'target':>8} {'AdamW':>6} {'NiNo':>6} {'saved':>7} {'wall AdamW':>11} {'wall NiNo':>10}")
    for r in rows:
        sn = r["steps_nino"] if r["steps_nino"] is not None else "-"
        sv = f"{r['saved_pct']:.1f}%" if r["saved_pct"] is not None else "-"
        print(
            f"{r['seed']:>4} {r['target']:>8.4f} {r['steps_adamw']:>6} {sn:>6} {sv:>7} "
            f"{r['wall_adamw']:>10.1f}s {r['wall_nino']:>9.1f}s"
        )
    saved = [r["saved_pct"] for r in rows if r["saved_pct"] is not None]
    if saved:
        print(
            f"steps saved by {label}: mean {np.mean(saved):.1f}% (min {min(saved):.1f}%, "
            f"max {max(saved):.1f}%) over the {len(saved)}/{len(rows)} seeds that reached the target"
        )
    else:
        print(f"{label} reached AdamW's final validation loss in none of the {len(rows)} seeds")
    nino_total = sum(r["nino_steps_time"] for r in rows)
    print(f"NiNo steps took {nino_total:.1f}s in all; total wall time {time.perf_counter() - t_start:.0f}s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "demo_lm" if args.task == "lm" else "demo"
    plot(runs, targets, label, out / f"{prefix}_loss.png", title)
    (out / f"{prefix}_results.json").write_text(json.dumps(dict(predictor=ckpt, args=vars(args), seeds=rows), indent=1))
    print(f"wrote {out / f'{prefix}_loss.png'} and {out / f'{prefix}_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
