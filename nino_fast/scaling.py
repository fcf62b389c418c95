"""Scaling of the parameter history before NiNo, and its inverse (the official 'std' and three other methods).

Per parameter tensor t with history ``w`` (n_t, C):

- ``std``           (w - mean(w)) / (std(w) + eps), mean/std (unbiased) over all n_t * C values
- ``min-max``       w / (max(w) - min(w) + eps), the range clamped to >= 1e-2
- ``std-param``     per parameter over its C values, std clamped to >= 1e-2, one pass over the whole vector
- ``min-max-param`` as the official code does it: the range of the *first* parameter (clamped to >= 1e-2) for all

eps = 1e-6. ``scales`` is a (T, 2) or (P, 2) tensor of (shift, scale) per tensor or per parameter.
"""

from __future__ import annotations

import math

import torch

METHODS = ("std", "std-param", "min-max", "min-max-param")
EPS = 1e-6


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"scale method must be one of {METHODS}, got {method!r}")


def _sizes(param_shapes) -> list[int]:
    return [math.prod(s) for _, s in param_shapes]


def scale_params(states: torch.Tensor, param_shapes, method: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a (P, C) history; returns (scaled (P, C), scales). Does not modify ``states``."""
    _check(method)
    if method == "std-param":
        mn = states.mean(1, keepdim=True)
        sd = states.std(1, keepdim=True).clamp_min(1e-2)
        return (states - mn) / (sd + EPS), torch.cat((mn, sd), 1)
    if method == "min-max-param":
        first = states[0]
        sd = (first.max() - first.min()).clamp_min(1e-2).reshape(1, 1).expand(states.shape[0], 1)
        mn = torch.zeros_like(sd)
        return states / (sd + EPS), torch.cat((mn, sd), 1)
    out = torch.empty_like(states)
    scales = torch.empty(len(param_shapes), 2, dtype=states.dtype, device=states.device)
    off = 0
    for i, n in enumerate(_sizes(param_shapes)):  # one step per parameter tensor, vectorised inside
        w = states[off : off + n]
        if method == "std":
            mn, sd = w.mean(), w.std()
        else:
            mn, sd = torch.zeros((), dtype=w.dtype, device=w.device), (w.max() - w.min()).clamp_min(1e-2)
        out[off : off + n] = (w - mn) / (sd + EPS)
        scales[i, 0], scales[i, 1] = mn, sd
        off += n
    return out, scales


def unscale_params(x: torch.Tensor, param_shapes, scales: torch.Tensor, method: str = "std") -> torch.Tensor:
    """Inverse of :func:`scale_params` for a (P,) prediction: ``x * scale + shift``."""
    _check(method)
    if method.endswith("-param"):
        return x * scales[:, 1] + scales[:, 0]
    sizes = torch.tensor(_sizes(param_shapes), device=x.device)
    per = torch.repeat_interleave(scales, sizes, dim=0)
    return x * per[:, 1] + per[:, 0]
