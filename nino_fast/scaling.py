"""Scaling of the parameter history before NiNo, and its inverse (the official 'std' and three other methods).

Per parameter tensor t with history ``w`` (n_t, C):

- ``std``           (w - mean(w)) / (std(w) + eps), mean/std (unbiased) over all n_t * C values
- ``min-max``       w / (max(w) - min(w) + eps), the range clamped to >= 1e-2
- ``std-param``     per parameter over its C values, std clamped to >= 1e-2, one pass over the whole vector
- ``min-max-param`` as the official code does it: the range of the *first* parameter (clamped to >= 1e-2) for all

eps = 1e-6. ``scales`` is a (T, 2) or (P, 2) tensor of (shift, scale) per tensor or per parameter.

:func:`scale_stats` gives the ``scales`` alone and :func:`scale_rows` / :func:`unscale_rows` apply them to any
subset of rows with the same float32 operations, so a streamed step (:mod:`nino_fast.stream`) scales edge tiles
on the fly and gets bitwise the values of :func:`scale_params` without a second (P, C) copy of the history.
"""

from __future__ import annotations

import math

import torch

METHODS = ("std", "std-param", "min-max", "min-max-param")
EPS = 1e-6
ROWS = 1 << 20  # history rows per elementwise chunk: bounds the temporaries to a few (ROWS, C) tensors


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"scale method must be one of {METHODS}, got {method!r}")


def _sizes(param_shapes) -> list[int]:
    return [math.prod(s) for _, s in param_shapes]


def scale_stats_of_columns(
    columns: torch.Tensor, param_shapes, method: str = "std", dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """:func:`scale_stats` of a history stored transposed, ``columns`` (C, P) (a snapshot buffer: one row per
    snapshot), without making the (P, C) copy: each parameter tensor's rows are copied contiguous in ``dtype`` one
    tensor at a time, so the statistics are bitwise those of ``scale_stats(h, param_shapes, method, torch.float32)``
    with ``h = torch.empty(P, C, dtype=dtype).copy_(columns.t())``. Returns (T, 2) for per-tensor methods, (1, 2)
    for ``min-max-param`` (the first parameter's range: the scales of all) and None for ``std-param`` (each
    parameter's own, from its row)."""
    _check(method)
    C = columns.shape[0]
    if method == "std-param":
        return None
    if method == "min-max-param":
        first = torch.empty(1, C, dtype=dtype, device=columns.device).copy_(columns[:, :1].t())
        return scale_stats(first, None, method, torch.float32)[:1]
    out, off = [], 0
    for shape, n in zip(param_shapes, _sizes(param_shapes), strict=True):
        rows = torch.empty(n, C, dtype=dtype, device=columns.device).copy_(columns[:, off : off + n].t())
        out.append(scale_stats(rows, [shape], method, torch.float32))
        off += n
    return torch.cat(out) if out else torch.empty(0, 2, device=columns.device)


def per_tensor(method: str) -> bool:
    """Whether ``method``'s scales are one (shift, scale) per parameter tensor (else one per parameter)."""
    _check(method)
    return not method.endswith("-param")


def scale_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x - shift) / (scale + eps)``: rows (n, C) with scalar or (n, 1) shift/scale."""
    return (x - shift) / (scale + EPS)


def scale_rows_(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`scale_rows` in place on ``x`` (the same operations, bitwise the same values)."""
    return x.sub_(shift).div_(scale + EPS)


def slot_lookup(slots: torch.Tensor, rows: torch.Tensor | None, scales: torch.Tensor, ends: torch.Tensor | None):
    """``(where, params, r, shift, scale)`` of the edge slots that hold a parameter: their positions in ``slots``,
    the parameters ``p = slots[where]``, their history rows ``r = rows[p]`` (None: p) and the (shift, scale) of the
    parameter tensor holding each row (``ends``: the tensors' cumulative row counts) or, without ``ends``, of the
    row itself (all int64 / float32 on ``slots``' device). The lookup of :func:`scaled_history_reference` and
    :func:`nino_fast.finish.finish_history_reference`."""
    where = (slots >= 0).nonzero().squeeze(1)
    params = slots[where].long()
    r = params if rows is None else rows.index_select(0, params).long()
    t = torch.searchsorted(ends, r, right=True) if ends is not None else r
    sc = scales.index_select(0, t)
    return where, params, r, sc[:, 0], sc[:, 1]


def history_rows(states: torch.Tensor, r: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
    """``states[r, cols]`` as float32 on ``r``'s device, gathered where ``states`` lives (a CPU history may feed a
    GPU step)."""
    x = torch.index_select(states[:, cols], 0, r.to(states.device))
    return x.to(device=r.device, dtype=torch.float32)


def scaled_slot_rows(states, slots, rows, scales, ends) -> tuple[torch.Tensor, torch.Tensor]:
    """``(where, x)``: the positions of the slots holding a parameter and their scaled history rows (the rows of
    :func:`scaled_history_reference`, for a caller that writes them into its own buffer)."""
    where, _, r, shift, scale = slot_lookup(slots, rows, scales, ends)
    return where, scale_rows_(history_rows(states, r), shift.unsqueeze(1), scale.unsqueeze(1))


def scaled_history_reference(
    states: torch.Tensor,
    slots: torch.Tensor,
    rows: torch.Tensor | None,
    scales: torch.Tensor,
    ends: torch.Tensor | None,
) -> torch.Tensor:
    """Specification of the ``nino_fast::scaled_history`` op: (S, C) float32 scaled history rows of edge slots.

    Slot i holds parameter ``p = slots[i]`` (-1: none, a zero row); its history row is ``r = rows[p]`` (None: p),
    its scales ``scales[t]`` with ``t`` the parameter tensor holding row r (``ends``: the tensors' cumulative row
    counts) or, without ``ends``, ``t = r`` (per-parameter scales). The row is :func:`scale_rows_` of
    ``states[r]`` in float32."""
    out = torch.zeros(slots.numel(), states.shape[1], dtype=torch.float32, device=slots.device)
    return out.index_copy_(0, *scaled_slot_rows(states, slots, rows, scales, ends))


def unscale_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift``, the inverse of :func:`scale_rows` on a prediction."""
    return x * scale + shift


def scale_stats(states: torch.Tensor, param_shapes, method: str = "std", dtype: torch.dtype | None = None):
    """The ``scales`` of :func:`scale_params` alone: (T, 2) for per-tensor methods, (P, 2) otherwise.

    ``states`` (P, C) is read tensor by tensor; with ``dtype`` each tensor's rows are converted to it first (one
    tensor at a time), giving the scales of ``scale_params(states.to(dtype), ...)``."""
    _check(method)
    dtype = dtype or states.dtype
    f32 = lambda w: w.to(dtype)  # noqa: E731  (a no-op when states already has that dtype)
    if method == "std-param":
        x = f32(states)
        return torch.cat((x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-2)), 1)
    if method == "min-max-param":
        first = f32(states[0])
        sd = (first.max() - first.min()).clamp_min(1e-2).reshape(1, 1).expand(states.shape[0], 1)
        return torch.cat((torch.zeros_like(sd), sd), 1)
    scales = torch.empty(len(param_shapes), 2, dtype=dtype, device=states.device)
    off = 0
    for i, n in enumerate(_sizes(param_shapes)):  # one step per parameter tensor, vectorised inside
        w = f32(states[off : off + n])
        if method == "std":
            scales[i, 0], scales[i, 1] = w.mean(), w.std()
        else:
            scales[i, 0], scales[i, 1] = 0.0, (w.max() - w.min()).clamp_min(1e-2)
        off += n
    return scales


def scale_params(states: torch.Tensor, param_shapes, method: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a (P, C) history; returns (scaled (P, C), scales). Does not modify ``states``."""
    scales = scale_stats(states, param_shapes, method)
    out = torch.empty_like(states)
    if not per_tensor(method):
        for a in range(0, states.shape[0], ROWS):
            out[a : a + ROWS] = scale_rows(states[a : a + ROWS], scales[a : a + ROWS, :1], scales[a : a + ROWS, 1:])
        return out, scales
    off = 0
    for i, n in enumerate(_sizes(param_shapes)):
        for a in range(off, off + n, ROWS):  # chunks: no (n_t, C) temporaries for the largest tensors
            b = min(off + n, a + ROWS)
            out[a:b] = scale_rows(states[a:b], scales[i, 0], scales[i, 1])
        off += n
    return out, scales


def row_scales(scales: torch.Tensor, param_shapes, method: str = "std") -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) shift and (P,) scale of every parameter (row) from :func:`scale_params`' ``scales``."""
    _check(method)
    if per_tensor(method):
        sizes = torch.tensor(_sizes(param_shapes), device=scales.device)
        scales = torch.repeat_interleave(scales, sizes, dim=0)
    return scales[:, 0], scales[:, 1]


def unscale_params(x: torch.Tensor, param_shapes, scales: torch.Tensor, method: str = "std") -> torch.Tensor:
    """Inverse of :func:`scale_params` for a (P,) prediction: ``x * scale + shift``."""
    return unscale_rows(x, *row_scales(scales, param_shapes, method))
