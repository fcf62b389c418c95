"""The last ``ctx`` snapshots of the predicted parameters, in one preallocated CPU buffer.

Row-major per snapshot, ``(ctx, n_params)``: recording one is a contiguous copy per parameter tensor, whatever
the device of the model (5 x 4 bytes per parameter in float32, half in bfloat16). A NiNo step reads them back as
the ``(n_params, ctx)`` history, oldest first, widened to float32 (float64 snapshots stay float64).
"""

from __future__ import annotations

import torch

from ..scaling import scale_stats_of_columns

DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


class SnapshotBuffer:
    """``count`` snapshots of ``num_params`` values kept in ``data[:count]``."""

    def __init__(self, num_params: int, ctx: int, dtype: torch.dtype = torch.float32):
        if dtype not in DTYPES:
            raise ValueError(f"NiNo: snapshot_dtype must be a floating dtype, got {dtype}")
        self.data = torch.empty(ctx, num_params, dtype=dtype)
        self.count = 0

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype of the history given to the predictor."""
        return torch.float64 if self.data.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def record(self, params: list[torch.Tensor]) -> None:
        row, off = self.data[self.count], 0
        for p in params:  # one copy per parameter tensor into the preallocated row
            n = p.numel()
            row[off : off + n].copy_(p.detach().reshape(-1))
            off += n
        self.count += 1

    def history(self) -> torch.Tensor:
        """(n_params, ctx), one contiguous copy: a strided view would give nowcast another summation order."""
        return torch.empty(self.data.shape[1], self.data.shape[0], dtype=self.work_dtype).copy_(self.data.t())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), ctx): the history of some parameters only (a process's part of the graph)."""
        return torch.empty(ids.numel(), self.data.shape[0], dtype=self.work_dtype).copy_(
            self.data.t().index_select(0, ids)
        )

    def scale_stats(self, param_shapes, method: str) -> torch.Tensor:
        """The full history's per-tensor scaling statistics, one parameter tensor at a time."""
        return scale_stats_of_columns(self.data, param_shapes, method, dtype=self.work_dtype)

    def checksum(self) -> int:
        """An exact digest of the kept snapshots: the sum of their bit patterns as integers, independent of the
        summation order and thread count (processes holding the same values get the same number)."""
        flat = self.data[: self.count].reshape(-1)
        bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        return sum(int(chunk.sum(dtype=torch.int64)) for chunk in bits.split(1 << 22))

    def saved(self) -> torch.Tensor | None:
        """A copy of the kept snapshots (None when there are none)."""
        return self.data[: self.count].clone() if self.count else None

    def check(self, count: int, snaps, who: str) -> None:
        """Raise ValueError unless ``snaps`` can be restored as ``count`` kept snapshots."""
        if not count:
            return
        shape = (count, self.data.shape[1])
        if not isinstance(snaps, torch.Tensor) or not snaps.is_floating_point():
            raise ValueError(f"{who}: snapshots must be a floating tensor, got {type(snaps).__name__}")
        if tuple(snaps.shape) != shape:
            raise ValueError(f"{who}: snapshots have shape {tuple(snaps.shape)}, expected {shape}")
        if not bool(torch.isfinite(snaps).all()):
            raise ValueError(f"{who}: the snapshots hold NaN/Inf values")

    def restore(self, count: int, snaps) -> None:
        """Keep ``snaps`` (checked with :meth:`check`), cast to the buffer's dtype."""
        if count:
            self.data[:count].copy_(snaps)
        self.count = count
