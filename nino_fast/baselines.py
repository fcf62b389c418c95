"""Linefit and Linefit+ (NiNo's baselines): per-parameter straight-line extrapolation of the history.

Both take the same ``nowcast(graph, states, k)`` call as :class:`~nino_fast.NiNoModel`, so the optimizer
wrapper and the offline step use them interchangeably (``NiNo(..., ckpt='linefit')``).

The maths. ``states`` is the ``(P, C)`` history of P parameters at C snapshots, oldest first, taken every
``period // C`` optimizer steps. Time is measured in snapshot spacings: snapshot j sits at ``t_j = j``
(``j = 0 .. C-1``) and the horizon-k prediction is the fitted line evaluated at ``t* = C - 1 + k``, i.e. k
snapshot spacings after the last snapshot (the unit NiNo's horizon k uses). Per parameter p, with weights
``w_j > 0``:

    a_p, b_p = argmin_{a, b} sum_j w_j (a + b t_j - y_pj)^2
    pred_p   = a_p + b_p t*

whose closed form (weighted mean ``t_bar = sum_j w_j t_j / W``, ``W = sum_j w_j``,
``S = sum_j w_j (t_j - t_bar)^2``) is a fixed linear filter of the history:

    pred_p = sum_j c_j y_pj,   c_j = w_j / W + w_j (t_j - t_bar) (t* - t_bar) / S

so C multiply-adds over the ``(P, C)`` history predict every parameter (no loop over parameters or tensors; in
the order j = 0..C-1, elementwise, so the bits do not depend on the thread count as a BLAS product's would). The
filter is exact for linear trajectories, whatever the weights (sum_j c_j = 1 and sum_j c_j t_j = t*).

- ``Linefit``  (``weights='uniform'``): ordinary least squares, ``w_j = 1``.
- ``Linefit+`` (``weights='linear'``): later snapshots weigh more, ``w_j = j + 1`` (1, 2, ..., C), so the line
  follows the most recent part of a curving trajectory. This weighting is this project's definition of
  Linefit+ (the issue asks for "weighting later points more"); any other positive weights can be passed
  explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WEIGHTINGS = ("uniform", "linear")


def apply_filter(states: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_j states[:, j] * c[j]`` (``states @ c``), summed in the order j = 0..C-1 one column at a time: the
    same bits at any thread count."""
    out = states[:, 0] * c[0]
    for j in range(1, states.shape[1]):
        out += states[:, j] * c[j]
    return out


def linefit_coefficients(ctx: int, k: float, weights: str | Sequence[float] = "uniform") -> torch.Tensor:
    """The (ctx,) float64 filter ``c`` with ``prediction = states @ c`` (see the module docstring)."""
    if ctx < 2:
        raise ValueError(f"linefit_coefficients: ctx must be >= 2 to fit a line, got {ctx}")
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise ValueError(
                f"linefit_coefficients: weights must be one of {WEIGHTINGS} or a sequence, got {weights!r}"
            )
        w = (
            torch.ones(ctx, dtype=torch.float64)
            if weights == "uniform"
            else torch.arange(1, ctx + 1, dtype=torch.float64)
        )
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != ctx or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"linefit_coefficients: weights must be {ctx} finite positive numbers, got {w.tolist()}")
    t = torch.arange(ctx, dtype=torch.float64)
    t_star = ctx - 1 + float(k)
    W = w.sum()
    t_bar = (w * t).sum() / W
    S = (w * (t - t_bar) ** 2).sum()
    return w / W + w * (t - t_bar) * (t_star - t_bar) / S


class Linefit:
    """Least-squares line through the last ``ctx`` snapshots of every parameter, evaluated k spacings ahead.

    Args:
        ctx: number of snapshots (5, as the NiNo checkpoints).
        seq_len: the largest horizon, only used by the optimizer wrapper's k schedule (40, as NiNo).
        weights: ``'uniform'`` (Linefit), ``'linear'`` (Linefit+: ``w_j = j + 1``), or ``ctx`` positive
            numbers.
    """

    needs_graph = False  # the prediction uses no connectivity: the wrapper skips building a neural graph
    is_mlp = False
    lpe = 0

    def __init__(self, ctx: int = 5, seq_len: int = 40, weights: str | Sequence[float] = "uniform"):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"Linefit: seq_len must be an int >= 1, got {seq_len!r}")
        linefit_coefficients(ctx, 1, weights)  # validates ctx and weights now rather than at the first step
        self.ctx, self.seq_len, self.weights = ctx, seq_len, weights

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ctx={self.ctx}, seq_len={self.seq_len}, weights={self.weights!r})"

    @torch.no_grad()
    def nowcast(self, graph, states: torch.Tensor, k: int, backend: str | None = None) -> torch.Tensor:
        """(P, ctx) history, oldest first -> (P,) prediction at horizon k, in ``states``' dtype and device.

        ``graph`` is only checked for its ``num_params`` (may be None); ``backend`` is accepted for interface
        compatibility with :meth:`NiNoModel.nowcast` and ignored. Raises ValueError for bad inputs or a
        non-finite prediction, like NiNoModel.
        """
        name = type(self).__name__
        if not isinstance(states, torch.Tensor) or states.dim() != 2 or states.shape[1] != self.ctx:
            shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(f"{name}.nowcast: states must be a (n_params, ctx={self.ctx}) tensor, got {shape}")
        if not states.is_floating_point():
            raise ValueError(f"{name}.nowcast: states must be floating point, got {states.dtype}")
        if graph is not None and states.shape[0] != graph.num_params:
            raise ValueError(
                f"{name}.nowcast: states has {states.shape[0]} rows, the graph has {graph.num_params} parameters"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name}.nowcast: k must be an int >= 1, got {k!r}")
        bad = (~torch.isfinite(states)).sum().item()
        if bad:
            raise ValueError(f"{name}.nowcast: states contain {bad} NaN/Inf values")
        # float64 history keeps float64; anything narrower is computed in float32 (bf16 filters lose the fit)
        work = torch.float64 if states.dtype == torch.float64 else torch.float32
        c = linefit_coefficients(self.ctx, k, self.weights).to(device=states.device, dtype=work)
        out = apply_filter(states.to(work), c)
        bad = (~torch.isfinite(out)).sum().item()
        if bad:
            raise ValueError(f"{name}.nowcast: the prediction has {bad} NaN/Inf values")
        return out.to(states.dtype)


class LinefitPlus(Linefit):
    """Linefit+: :class:`Linefit` with weights ``w_j = j + 1`` (later snapshots count more)."""

    def __init__(self, ctx: int = 5, seq_len: int = 40):
        super().__init__(ctx, seq_len, weights="linear")


def make_baseline(name: str, ctx: int = 5, seq_len: int = 40) -> Linefit:
    """``'linefit'`` or ``'linefit+'`` (case-insensitive) -> the baseline predictor."""
    key = name.lower().replace("_", "").replace("-", "")
    if key == "linefit":
        return Linefit(ctx, seq_len)
    if key in ("linefit+", "linefitplus"):
        return LinefitPlus(ctx, seq_len)
    raise ValueError(f"make_baseline: unknown baseline {name!r}; expected 'linefit' or 'linefit+'")
