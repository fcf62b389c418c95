"""The meta-training tasks: small models on data that ships with packages, their specs, and the default plan.

A task is a JSON-able dict (a *spec*)::

    {"family": "convnet" | "mlp", "width": 8, "depth": 3, "act": "relu", "opt": "adamw", "lr": 3e-3,
     "wd": 0.01, "seed": 101, "steps": 2400, "batch": 64, "save_every": 20}

- ``convnet``: the demo's ConvNet family on sklearn digits (8x8): ``depth`` 3x3 convolutions (``1 -> w``,
  ``w -> 2w`` with stride 2, then ``2w -> 2w``), activations, global average pooling, a linear classifier.
- ``mlp``: flattened digits, ``depth`` hidden layers of ``width`` units (``widths`` for uneven ones).

Held out (never in the training plan, checked by :func:`check_plan`):

- the **demo task**, :mod:`nino_fast.demo`'s ConvNet (width 16, depth 3): no ConvNet of width 16 at all, at any
  depth, seed or learning rate;
- the **held-out task**, an MLP 64-128-128-128-10 (three hidden layers of 128: deeper and wider than every
  MLP in the plan), AdamW lr 3e-4 (below the plan's 1e-3..5e-3; at 3e-3 this MLP overfits digits within 200
  steps, so "steps to AdamW's final loss" would measure nothing).

Both are evaluated with the demo's protocol by ``bench/bench_meta_eval.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}

DEMO_TASK = dict(family="convnet", width=16, depth=3, act="relu", opt="adamw", lr=3e-3, wd=0.01)
HELDOUT_TASK = dict(family="mlp", widths=[128, 128, 128], act="relu", opt="adamw", lr=3e-4, wd=0.01)


def task_id(spec: dict) -> str:
    """A readable unique name, e.g. ``convnet-w8-d3-relu-adamw-lr0.003-wd0.01-s101``."""
    shape = "x".join(map(str, spec["widths"])) if "widths" in spec else f"w{spec['width']}-d{spec['depth']}"
    return f"{spec['family']}-{shape}-{spec['act']}-{spec['opt']}-lr{spec['lr']:g}-wd{spec['wd']:g}-s{spec['seed']}"


def is_held_out(spec: dict) -> bool:
    """Whether ``spec`` is too close to a held-out task: a ConvNet of the demo's width (any depth) or the
    held-out MLP's widths, at any seed, learning rate or optimizer."""
    if spec["family"] == "convnet":
        return spec.get("width") == DEMO_TASK["width"]
    return spec["family"] == "mlp" and list(_mlp_widths(spec)) == HELDOUT_TASK["widths"]


def _mlp_widths(spec: dict) -> list[int]:
    return list(spec["widths"]) if "widths" in spec else [spec["width"]] * spec["depth"]


def build_model(spec: dict) -> nn.Module:
    act = _ACTS[spec.get("act", "relu")]
    if spec["family"] == "convnet":
        w, depth = spec["width"], spec["depth"]
        if depth < 2:
            raise ValueError(f"build_model: a convnet needs depth >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(1, w, 3, padding=1), act(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)]
        layers.append(act())
        for _ in range(depth - 2):
            layers += [nn.Conv2d(2 * w, 2 * w, 3, padding=1), act()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10)]
        return nn.Sequential(*layers)
    if spec["family"] == "mlp":
        layers, d = [nn.Flatten()], 64
        for w in _mlp_widths(spec):
            layers += [nn.Linear(d, w), act()]
            d = w
        layers.append(nn.Linear(d, 10))
        return nn.Sequential(*layers)
    raise ValueError(f"build_model: unknown family {spec['family']!r} (expected 'convnet' or 'mlp')")


def named_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The model's trainable ``(name, shape)`` list, in ``named_parameters`` order (the snapshot layout)."""
    return [(n, tuple(p.shape)) for n, p in build_model(spec).named_parameters()]


def digits():
    """The demo's stratified 80/20 split of sklearn digits: (x_train, y_train, x_val, y_val)."""
    from ..demo import load_digits_split

    return load_digits_split()


def make_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    if spec["opt"] == "adamw":
        return torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["wd"])
    if spec["opt"] == "adam":
        return torch.optim.Adam(params, lr=spec["lr"], weight_decay=spec["wd"])
    raise ValueError(f"make_optimizer: unknown optimizer {spec['opt']!r} (expected 'adamw' or 'adam')")


def run_task(spec: dict, on_snapshot: Callable[[int, torch.Tensor, float], None], data=None) -> dict:
    """Train ``spec``'s model, calling ``on_snapshot(index, flat_params, val_loss)`` at step 0 and every
    ``save_every`` steps (the parameters as they are *before* the step of that index, as NiNo records them).

    Returns ``{"seconds", "final_val_loss", "diverged"}``; a run whose loss or parameters go non-finite stops there
    (``diverged=True``).
    """
    x_tr, y_tr, x_va, y_va = data or digits()
    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    opt = make_optimizer(spec, model.parameters())
    batches = torch.Generator().manual_seed(spec["seed"])
    t0 = time.perf_counter()
    every, steps = spec["save_every"], spec["steps"]
    val = float("nan")
    for i in range(steps + 1):
        if i % every == 0:
            with torch.no_grad():
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                val = F.cross_entropy(model(x_va), y_va).item()
            if not (torch.isfinite(flat).all() and flat.abs().max() < 6e4):  # float16 range
                return {"seconds": time.perf_counter() - t0, "final_val_loss": val, "diverged": True}
            on_snapshot(i // every, flat, val)
        if i == steps:
            break
        idx = torch.randint(len(y_tr), (spec["batch"],), generator=batches)
        opt.zero_grad()
        F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
    return {"seconds": time.perf_counter() - t0, "final_val_loss": val, "diverged": False}


def default_plan(steps: int = 2400, save_every: int = 20) -> list[dict]:
    """The training plan: ConvNets and MLPs of varied width/depth/activation, AdamW/Adam at varied lr and
    seeds, interleaved (so that a time-bounded collection gets a mix of families)."""
    convs = [(8, 3), (12, 3), (8, 2), (24, 3), (12, 4), (20, 2), (6, 3), (32, 2), (10, 4), (24, 2)]
    mlps = [[32], [64], [32, 32], [64, 64], [96, 48], [48, 48], [128], [64, 32]]
    lrs = [3e-3, 1e-3, 5e-3, 2e-3]
    opts = [("adamw", 0.01), ("adam", 0.0), ("adamw", 0.1)]
    acts = ["relu", "relu", "gelu", "tanh"]
    plan, seed = [], 100
    for r in range(12):
        for j, (w, d) in enumerate(convs):
            seed += 1
            o, wd = opts[(r + j) % len(opts)]
            spec = dict(
                family="convnet",
                width=w,
                depth=d,
                act=acts[(r + j) % len(acts)],
                opt=o,
                lr=lrs[(r + 2 * j) % len(lrs)],
                wd=wd,
                seed=seed,
            )
            plan.append(spec)
            if j < len(mlps):
                seed += 1
                o, wd = opts[(r + j + 1) % len(opts)]
                spec = dict(
                    family="mlp",
                    widths=mlps[(r + j) % len(mlps)],
                    act=acts[(r + 3 * j) % len(acts)],
                    opt=o,
                    lr=lrs[(r + j) % len(lrs)],
                    wd=wd,
                    seed=seed,
                )
                plan.append(spec)
    for spec in plan:
        spec.update(steps=steps, batch=64, save_every=save_every)
    check_plan(plan)
    return plan


def check_plan(plan: list[dict]) -> None:
    """Raise if a held-out task (the demo's or the held-out one) is in ``plan`` or two specs share an id."""
    bad = [task_id(s) for s in plan if is_held_out(s)]
    if bad:
        raise ValueError(f"the training plan contains held-out tasks: {bad[:3]}")
    ids = [task_id(s) for s in plan]
    if len(set(ids)) != len(ids):
        raise ValueError("the training plan has duplicate task ids")
