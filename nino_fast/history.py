"""Parameter histories read one parameter tensor at a time: the input of a step over a graph too large to hold.

A NiNo step reads the (P, C) history (C = ctx snapshots, oldest first, parameters in graph order) in two ways:
whole tensors, for the per-tensor scaling statistics, and the rows of the parameters on one tile's edges.
:class:`TensorHistory` serves both from any store that can read a parameter tensor's (n_t, C) rows: an in-memory
(P, C) tensor (:class:`MemoryHistory`) or checkpoints on disk (:class:`nino_fast.offline.step.SnapshotHistory`,
read file by file). It keeps the tensors the current tile needs (a tile's rows come from a few tensors, and
consecutive tiles mostly from the same ones), so each tensor is read about once per pass over the graph.

Exactness: every value read is converted to float32 exactly as the in-memory step converts its history, and the
statistics are those of :func:`nino_fast.scaling.scale_stats` on the same float32 rows, tensor by tensor, so a
step fed from here gives bitwise the in-memory step's result.
"""

from __future__ import annotations

import math

import torch

from .scaling import per_tensor, scale_stats


class NonFiniteHistory(ValueError):
    """A parameter tensor of the history holds NaN/Inf values."""


class TensorHistory:
    """A (P, C) history held as its T parameter tensors; subclasses implement :meth:`read`.

    ``param_shapes``: the graph's ``(name, shape)`` list (graph order); ``ctx``: C; ``dtype``: the dtype its
    values are stored in (the prediction is returned in it)."""

    def __init__(self, param_shapes, ctx: int, dtype: torch.dtype):
        self.param_shapes, self.ctx, self.dtype = list(param_shapes), int(ctx), dtype
        sizes = [math.prod(s) for _, s in self.param_shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self._kept: dict[int, torch.Tensor] = {}

    @property
    def num_params(self) -> int:
        return self.offsets[-1]

    def read(self, t: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(n_t, C) rows of parameter tensor ``t``, in ``dtype`` (None: as stored, any floating dtype)."""
        raise NotImplementedError

    def scales(self, method: str, tensors=None) -> torch.Tensor | None:
        """The per-tensor (T, 2) statistics of ``method`` (bitwise :func:`~nino_fast.scaling.scale_stats` of the
        float32 history), read tensor by tensor; None for per-parameter methods (a tile's rows give their own).
        ``tensors``: only these tensors' (and their finiteness check; zeros for the others). Raises
        :class:`NonFiniteHistory` naming the first tensor with NaN/Inf values."""
        out = torch.zeros(len(self.param_shapes), 2) if per_tensor(method) else None
        for t in range(len(self.param_shapes)) if tensors is None else tensors:
            name, shape = self.param_shapes[t]
            rows = self.read(t, torch.float32)  # the largest tensor's float32 rows: this step's peak memory
            if count_nonfinite(rows):
                raise NonFiniteHistory(f"the history of {name!r} contains NaN/Inf values")
            if out is not None:
                out[t] = scale_stats(rows, [(name, shape)], method, torch.float32)[0]
        return out

    def first_row(self) -> torch.Tensor:
        """(1, C) float32: the first parameter's history (``min-max-param`` scales every parameter by its range)."""
        return self.read(0, torch.float32)[:1].clone()

    def segments(self, ids: torch.Tensor) -> tuple[int, ...]:
        """``seg`` (T+1,): ``ids[seg[t]:seg[t+1]]`` are the parameters of tensor t (``ids`` sorted)."""
        bounds = torch.tensor(self.offsets, dtype=ids.dtype)
        return tuple(torch.searchsorted(ids, bounds).tolist())

    def gather(self, ids: torch.Tensor, seg: tuple[int, ...]) -> torch.Tensor:
        """(n, C) float32 history of the parameters ``ids`` (sorted; ``seg`` from :meth:`segments`). Tensors the
        call does not need are let go first, those it needs are read once and kept for the next call."""
        need = [t for t in range(len(seg) - 1) if seg[t + 1] > seg[t]]
        for t in [t for t in self._kept if t not in need]:
            del self._kept[t]
        out = torch.empty(ids.numel(), self.ctx, dtype=torch.float32)
        for t in need:
            if t not in self._kept:
                self._kept[t] = self.read(t)
            rows, (a, b) = self._kept[t], (seg[t], seg[t + 1])
            local = ids[a:b].long() - self.offsets[t]
            lo, hi = int(local[0]), int(local[-1]) + 1
            if hi - lo == b - a:  # a contiguous run (a weight's rows): a slice, no gather
                out[a:b] = rows[lo:hi]
            else:
                out[a:b] = rows.index_select(0, local)
        return out

    def release(self) -> None:
        """Let go of the tensors kept between calls of :meth:`gather`."""
        self._kept.clear()


class MemoryHistory(TensorHistory):
    """A (P, C) history tensor seen tensor by tensor (views, no copies)."""

    def __init__(self, states: torch.Tensor, param_shapes):
        super().__init__(param_shapes, states.shape[1], states.dtype)
        if states.shape[0] != self.num_params:
            raise ValueError(f"MemoryHistory: states has {states.shape[0]} rows, the graph {self.num_params}")
        self.states = states

    def read(self, t: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.states[self.offsets[t] : self.offsets[t + 1]].to(dtype or self.dtype)


def count_nonfinite(x: torch.Tensor, rows: int = 1 << 20) -> int:
    """NaN/Inf values in ``x``: one sum when all are finite (no temporary; NaN/Inf make the sum non-finite),
    counted by row chunks otherwise (no bool copy of a large history)."""
    if bool(torch.isfinite(x.sum())):
        return 0
    return sum(int((~torch.isfinite(x[a : a + rows])).sum()) for a in range(0, x.shape[0], rows))


class ColumnsHistory(TensorHistory):
    """A history stored transposed, ``columns`` (C, P) (the NiNo wrapper's snapshot buffer: one row per snapshot,
    any float dtype), seen tensor by tensor: each read copies one tensor's (n_t, C) rows, in ``dtype`` (the values
    of ``columns.t()`` converted to it: what the step on the whole (P, C) copy would read)."""

    def __init__(self, columns: torch.Tensor, param_shapes, dtype: torch.dtype = torch.float32):
        super().__init__(param_shapes, columns.shape[0], dtype)
        if columns.shape[1] != self.num_params:
            raise ValueError(f"ColumnsHistory: columns has {columns.shape[1]} columns, the graph {self.num_params}")
        self.columns = columns

    def read(self, t: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        a, b = self.offsets[t], self.offsets[t + 1]
        out = torch.empty(b - a, self.ctx, dtype=dtype or self.dtype, device=self.columns.device)
        return out.copy_(self.columns[:, a:b].t())
