"""The end of every NiNo step: residual on the last state, finiteness check, unscaling.

The in-memory step (``NiNoModel.nowcast`` with ``fused=False``, WNN+) finishes all parameters at once and the
streamed step (:mod:`nino_fast.stream`, also one process's part of a sharded step) finishes each tile's parameters
as its head pass ends; both call :func:`finish_rows`, so they do the same float32 operations on every value:

    out = last + upd_scale * delta   (residual; ``last`` the scaled last state)   or   out = delta
    value = out * scale + shift      (:func:`nino_fast.scaling.unscale_rows`)
"""

from __future__ import annotations

import torch

from .scaling import history_rows, scale_rows, slot_lookup, unscale_rows


class NonFinitePrediction(ValueError):
    """The step's prediction has NaN/Inf values (nothing was written to the model)."""


def finish_rows(
    delta: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    last: torch.Tensor | None = None,
    upd_scale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """``(values, bad)``: the unscaled predictions of n parameters and how many are NaN/Inf before unscaling.

    ``delta`` (n,): scaled predicted changes; ``shift`` / ``scale`` (n,) (or scalars): each parameter's scaling;
    ``last`` (n,): its scaled last state for a residual model, None for a model predicting the state itself."""
    out = delta if last is None else last + delta * upd_scale
    bad = 0
    if not torch.isfinite(out.sum()):  # one cheap pass; count exactly only when something is off
        bad = int((~torch.isfinite(out)).sum())
    return unscale_rows(out, shift, scale), bad


def raise_if_bad(bad: int, where: str) -> None:
    """:class:`NonFinitePrediction` naming ``where`` when ``bad`` values of the prediction are NaN/Inf."""
    if bad:
        raise NonFinitePrediction(f"{where}: the prediction has {bad} NaN/Inf values")


def finish_history_reference(
    result: torch.Tensor,
    delta: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
    rows: torch.Tensor | None,
    scales: torch.Tensor,
    ends: torch.Tensor | None,
    out_index: torch.Tensor | None,
    residual: bool,
    upd_scale: float,
) -> int:
    """Specification of the ``nino_fast::finish_history_`` op (the CPU kernel a streamed step's finish runs):
    :func:`finish_rows` of the parameters of edge slots, written into ``result``; returns the NaN/Inf count.

    ``delta`` (S,) float32: the scaled prediction of each slot; slot i holds parameter ``p = slots[i]`` (-1: none,
    skipped), its history row ``r = rows[p]`` (None: p) of ``states`` (P, C), its scales ``scales[t]`` with ``t``
    the parameter tensor holding row r (``ends``: the tensors' cumulative row counts) or ``t = r`` without
    ``ends``; ``last`` is the scaled last column of row r (``residual``). Writes ``result[out_index[p]]`` (None:
    ``result[p]``) in ``result``'s dtype."""
    mine, params, r, shift, scale = slot_lookup(slots, rows, scales, ends)
    last = scale_rows(history_rows(states, r, -1), shift, scale) if residual else None
    values, bad = finish_rows(delta[mine], shift, scale, last, upd_scale)
    at = params if out_index is None else out_index.index_select(0, params).long()
    result[at.to(result.device)] = values.to(device=result.device, dtype=result.dtype)
    return bad
