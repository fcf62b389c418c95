"""A model zoo on sklearn's digits (8x8 images, 10 classes, shipped with scikit-learn): small MLPs and ConvNets
trained with varied hyperparameters, each stored with its held-out test accuracy.

Layout of a zoo directory::

    zoo.json              {"format": "nino_fast.metanet.zoo/1", "seed": S, "models": {id: entry}}
    models/<id>.pt        {"spec": spec, "state_dict": ..., "test_acc": float, "train_acc": float}

An entry holds the model's ``spec`` (architecture and training hyperparameters, JSON), ``test_acc`` and its
``split`` ('train', 'val' or 'test': splits are by model, drawn from the model id). Model ``i`` of a zoo of seed
``S`` is a pure function of ``(S, i)``, so an interrupted :func:`build_zoo` resumes where it stopped (each model
file is written atomically, the manifest after every model).

A spec::

    {"kind": "mlp", "hidden": [32, 16], "act": "relu",                     # or
     "kind": "conv", "channels": [8, 16], "batchnorm": true, "act": "relu",
     "optimizer": "adam", "lr": 3e-3, "wd": 1e-4, "steps": 200, "batch": 64, "label_noise": 0.2, "seed": 7}
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "nino_fast.metanet.zoo/1"
ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
KINDS = ("mlp", "conv")
SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}
_ARCH_KEYS = {"mlp": ("hidden", "act"), "conv": ("channels", "batchnorm", "act")}


# ---- architectures -------------------------------------------------------------------------------------------
def check_spec(spec: dict) -> None:
    """Raise ValueError / TypeError naming the key unless ``spec`` describes a zoo architecture."""
    if not isinstance(spec, dict):
        raise TypeError(f"zoo spec must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"zoo spec: 'kind' must be one of {list(KINDS)}, got {kind!r}")
    missing = [k for k in _ARCH_KEYS[kind] if k not in spec]
    if missing:
        raise ValueError(f"zoo spec of kind {kind!r}: missing keys {missing}")
    widths = spec["hidden"] if kind == "mlp" else spec["channels"]
    name = "hidden" if kind == "mlp" else "channels"
    if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"zoo spec: {name!r} must be a list of positive ints, got {widths!r}")
    if kind == "conv" and not widths:
        raise ValueError("zoo spec: a ConvNet needs at least one entry in 'channels'")
    if spec["act"] not in ACTS:
        raise ValueError(f"zoo spec: 'act' must be one of {list(ACTS)}, got {spec['act']!r}")


def build_model(spec: dict) -> nn.Module:
    """The (untrained) ``nn.Sequential`` of a spec: an MLP on the 64 flattened pixels, or a ConvNet of 3x3
    convolutions (padding 1, stride 2 after the first; optional BatchNorm) with global average pooling and a
    linear classifier; 10 outputs."""
    check_spec(spec)
    act = ACTS[spec["act"]]
    layers: list[nn.Module] = [nn.Flatten()] if spec["kind"] == "mlp" else []
    if spec["kind"] == "mlp":
        width = 64
        for h in spec["hidden"]:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)
    width = 1
    for i, c in enumerate(spec["channels"]):
        layers.append(nn.Conv2d(width, c, 3, stride=1 if i == 0 else 2, padding=1))
        if spec["batchnorm"]:
            layers.append(nn.BatchNorm2d(c))
        layers.append(act())
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def model_from(spec: dict, state_dict: dict) -> nn.Module:
    """``build_model(spec)`` with ``state_dict`` loaded; ValueError naming the first mismatch otherwise."""
    model = build_model(spec)
    if not isinstance(state_dict, dict):
        raise TypeError(f"model_from: state_dict must be a dict, got {type(state_dict).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    if missing or extra:
        raise ValueError(f"the state dict does not match its spec {spec}: missing keys {missing}, unexpected {extra}")
    for key, want in own.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(
                f"the state dict does not match its spec {spec}: {key!r} has shape {shape}, expected "
                f"{tuple(want.shape)}"
            )
    model.load_state_dict(state_dict)
    return model.eval()


# ---- sampling specs ------------------------------------------------------------------------------------------
def sample_spec(seed: int, index: int) -> dict:
    """Model ``index`` of a zoo of seed ``seed``: architecture and training hyperparameters drawn so that test
    accuracies spread from chance (undertrained, tiny learning rates, heavy label noise) to ~98%."""
    rng = random.Random(seed * 1_000_003 + index)
    act = rng.choice(list(ACTS))
    if rng.random() < 0.5:
        arch = {"kind": "mlp", "hidden": [rng.choice([8, 16, 32, 48]) for _ in range(rng.randint(1, 3))], "act": act}
    else:
        chans = [rng.choice([8, 12, 16, 24]) for _ in range(rng.randint(2, 3))]
        arch = {"kind": "conv", "channels": chans, "batchnorm": rng.random() < 0.6, "act": act}
    optimizer = rng.choice(["sgd", "adam"])
    lo, hi = (-2.5, -0.5) if optimizer == "sgd" else (-3.3, -1.3)
    return {
        **arch,
        "optimizer": optimizer,
        "lr": round(10 ** rng.uniform(lo, hi), 6),
        "wd": rng.choice([0.0, 1e-4, 1e-3, 1e-2]),
        "steps": int(round(10 ** rng.uniform(1.3, 3.0))),
        "batch": 64,
        "label_noise": rng.choice([0.0, 0.0, 0.0, 0.2, 0.4, 0.6]),
        "seed": index,
    }


# ---- data and training ---------------------------------------------------------------------------------------
def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): sklearn's 1797 digits as (n, 1, 8, 8) float32 in [0, 1], a fixed
    split of 1200 training and 597 held-out test images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the metanet extra installs it
        raise ImportError("the metanet zoo needs scikit-learn: pip install 'nino_fast[metanet]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_model(spec: dict, data) -> tuple[nn.Module, float, float]:
    """Train the model of ``spec`` on the digits (``data`` from :func:`digits_split`): (model, train_acc,
    test_acc). Label noise replaces that fraction of the training labels by random ones (fixed per seed)."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    gen = torch.Generator().manual_seed(spec["seed"])
    y_noisy = y_tr.clone()
    flip = torch.rand(len(y_tr), generator=gen) < spec["label_noise"]
    y_noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    opt_cls = torch.optim.SGD if spec["optimizer"] == "sgd" else torch.optim.Adam
    kwargs = {"momentum": 0.9} if spec["optimizer"] == "sgd" else {}
    opt = opt_cls(model.parameters(), lr=spec["lr"], weight_decay=spec["wd"], **kwargs)
    model.train()
    for _ in range(spec["steps"]):
        idx = torch.randint(0, len(y_tr), (spec["batch"],), generator=gen)
        loss = F.cross_entropy(model(x_tr[idx]), y_noisy[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()):
        with torch.no_grad():  # a diverged run: its weights are garbage, its accuracy chance; keep it finite
            for p in model.state_dict().values():
                if p.is_floating_point():
                    p.nan_to_num_(0.0, 0.0, 0.0)
    return model, accuracy(model, x_tr, y_tr), accuracy(model, x_te, y_te)


# ---- the store -----------------------------------------------------------------------------------------------
def split_of(model_id: str, zoo_seed: int) -> str:
    """'train', 'val' or 'test' for a model, a fixed function of its id (splits are by model)."""
    u = random.Random(f"{zoo_seed}/{model_id}").random()
    return "train" if u < SPLITS["train"] else ("val" if u < SPLITS["train"] + SPLITS["val"] else "test")


def _atomic_save(obj, path: Path, text: bool = False) -> None:
    tmp = path.with_name(path.name + ".part")
    if text:
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_manifest(root: Path) -> dict:
    path = root / "zoo.json"
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a metanet zoo (format {manifest.get('format')!r}, expected {FORMAT!r})")
    return manifest


def build_zoo(
    out: str | os.PathLike,
    size: int = 1500,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
    max_steps: int | None = None,
) -> Path:
    """Train ``size`` zoo models into directory ``out`` (resumable: models already stored are skipped).

    Args:
        out: the zoo directory (created if missing).
        size: number of models (model ids ``m00000``..).
        seed: the zoo's seed: model ``i`` is :func:`sample_spec` ``(seed, i)``; an existing zoo keeps its seed.
        threads: torch threads while training (1: leave the other cores alone).
        progress: show a progress bar.
        max_steps: cap on each model's training steps (quick zoos for tests; the cap is recorded in the specs).
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"build_zoo: size must be a positive int, got {size!r}")
    root = Path(out)
    (root / "models").mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root) or {"format": FORMAT, "seed": seed, "models": {}}
    if manifest["seed"] != seed:
        raise ValueError(f"build_zoo: {root} was built with seed {manifest['seed']}, got seed={seed}")
    from tqdm.auto import tqdm

    data = digits_split()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        todo = [i for i in range(size) if f"m{i:05d}" not in manifest["models"]]
        for i in tqdm(todo, desc="zoo", disable=not progress):
            model_id, spec = f"m{i:05d}", sample_spec(seed, i)
            if max_steps is not None:
                spec["steps"] = min(spec["steps"], max_steps)
            model, train_acc, test_acc = train_model(spec, data)
            record = {"spec": spec, "state_dict": model.state_dict(), "test_acc": test_acc, "train_acc": train_acc}
            _atomic_save(record, root / "models" / f"{model_id}.pt")
            manifest["models"][model_id] = {"spec": spec, "test_acc": test_acc, "split": split_of(model_id, seed)}
            _atomic_save(json.dumps(manifest, indent=1), root / "zoo.json", text=True)
    finally:
        torch.set_num_threads(old_threads)
    return root


@dataclass
class ZooModel:
    """One stored model: ``id``, ``spec``, ``state_dict``, held-out ``test_acc`` and its ``split``."""

    id: str
    spec: dict
    state_dict: dict
    test_acc: float
    split: str

    def module(self) -> nn.Module:
        """The trained ``nn.Module`` (its state dict checked against its spec)."""
        return model_from(self.spec, self.state_dict)


def load_zoo(path: str | os.PathLike, splits: tuple[str, ...] | None = None) -> list[ZooModel]:
    """The models of a zoo directory (all, or those of ``splits``), in id order. ValueError for a missing or empty
    zoo, or a model file whose state dict does not match its spec."""
    root = Path(path)
    manifest = _read_manifest(root)
    if not manifest:
        raise ValueError(f"load_zoo: no zoo at {root} (no zoo.json); build one with `nino-fast metanet zoo --out`")
    entries = manifest["models"]
    if not entries:
        raise ValueError(f"load_zoo: the zoo at {root} is empty (0 models)")
    bad = [s for s in splits or () if s not in SPLITS]
    if bad:
        raise ValueError(f"load_zoo: splits must be among {list(SPLITS)}, got {bad}")
    out = []
    for model_id in sorted(entries):
        entry = entries[model_id]
        if splits is not None and entry["split"] not in splits:
            continue
        record = torch.load(root / "models" / f"{model_id}.pt", map_location="cpu", weights_only=True)
        model_from(entry["spec"], record["state_dict"])  # a corrupt file fails here, by name
        out.append(ZooModel(model_id, entry["spec"], record["state_dict"], float(entry["test_acc"]), entry["split"]))
    if not out:
        raise ValueError(f"load_zoo: the zoo at {root} has no models in splits {list(splits or ())}")
    return out


def accuracy_spread(models: list[ZooModel]) -> dict:
    """min / quartiles / max of the test accuracies (for logs and RESULTS)."""
    accs = sorted(m.test_acc for m in models)
    q = lambda f: accs[min(len(accs) - 1, int(math.floor(f * len(accs))))]
    return {"n": len(accs), "min": accs[0], "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "max": accs[-1]}
