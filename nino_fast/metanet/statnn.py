"""StatNN (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"): statistics of the weights
into a gradient-boosted tree regressor, the baseline a metanetwork has to beat.

The original takes per-layer statistics of one fixed architecture; the zoo mixes depths and widths, so the
statistics are taken per role instead: the first and last weighted layer, the hidden ones, all weights, all
biases, BatchNorm scales and running standard deviations (zeros where a model has none), plus the model's size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .features import params_of

_QUANTILES = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
_GROUPS = ("first", "last", "hidden", "weights", "biases", "bn_scale", "bn_std")


def stats(values: torch.Tensor) -> list[float]:
    """mean, std, mean |v| and the 0/25/50/75/100% quantiles of ``values`` (zeros when empty)."""
    v = values.reshape(-1).double()
    if v.numel() == 0:
        return [0.0] * (3 + len(_QUANTILES))
    std = float(v.std()) if v.numel() > 1 else 0.0
    return [float(v.mean()), std, float(v.abs().mean()), *torch.quantile(v, _QUANTILES.double()).tolist()]


def statnn_features(model: nn.Module | dict) -> list[float]:
    """One feature vector per model (a module or a state dict): :func:`stats` per parameter group, then
    log(number of parameters) and the number of weighted layers."""
    params, buffers = params_of(model)
    weights = [p for n, p in params if p.dim() >= 2]
    biases = [p for n, p in params if p.dim() == 1 and n.endswith(".bias") and not _is_norm(n, buffers)]
    bn_scale = [p for n, p in params if p.dim() == 1 and n.endswith(".weight")]
    bn_std = [v.clamp(min=0).sqrt() for n, v in buffers.items() if n.endswith(".running_var")]
    cat = lambda ts: torch.cat([t.detach().reshape(-1).float().cpu() for t in ts]) if ts else torch.zeros(0)
    groups = {
        "first": cat(weights[:1]),
        "last": cat(weights[-1:]),
        "hidden": cat(weights[1:-1]),
        "weights": cat(weights),
        "biases": cat(biases),
        "bn_scale": cat(bn_scale),
        "bn_std": cat(bn_std),
    }
    out = [x for g in _GROUPS for x in stats(groups[g])]
    return out + [math.log(sum(p.numel() for _, p in params)), float(len(weights))]


def _is_norm(name: str, buffers: dict) -> bool:
    return f"{name[: -len('.bias')]}.running_mean" in buffers


class StatNN:
    """Weight statistics -> ``sklearn.ensemble.GradientBoostingRegressor``. ``fit(models, targets)``,
    ``predict(models)``; models are modules or state dicts."""

    def __init__(self, seed: int = 0, n_estimators: int = 400, max_depth: int = 3, learning_rate: float = 0.05):
        try:
            from sklearn.ensemble import GradientBoostingRegressor
        except ImportError as exc:  # pragma: no cover - the metanet extra installs it
            raise ImportError("StatNN needs scikit-learn: pip install 'nino_fast[metanet]'") from exc
        self.regressor = GradientBoostingRegressor(
            n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate, subsample=0.8,
            random_state=seed,
        )  # fmt: skip

    def fit(self, models: list, targets) -> StatNN:
        self.regressor.fit([statnn_features(m) for m in models], list(targets))
        return self

    def predict(self, models: list) -> torch.Tensor:
        return torch.tensor(self.regressor.predict([statnn_features(m) for m in models]), dtype=torch.float32)
