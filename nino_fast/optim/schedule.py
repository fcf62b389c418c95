"""When NiNo steps happen and how far they look: the official k schedule and the wrapper's integer settings."""

from __future__ import annotations

import numpy as np


def k_schedule(K: int, max_train_steps: int, period: int, p: float = 2.0) -> list[int]:
    """Horizon of each NiNo step, the official schedule: ``round(linspace(K^(1/p), 1, n)^p)``,
    ``n = max(1, max_train_steps // period)`` (long horizons early in training, k = 1 at the end).

    >>> k_schedule(40, 10_000, 1000, 2)
    [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    """
    if K < 1 or period < 1 or max_train_steps < 0 or p <= 0:
        raise ValueError(
            f"k_schedule: need K >= 1, period >= 1, max_train_steps >= 0, p > 0; got K={K}, "
            f"max_train_steps={max_train_steps}, period={period}, p={p}"
        )
    n = max(1, max_train_steps // period)
    # numpy's round (half to even) on float64, as the official code, so the values match it everywhere
    return [int(v) for v in (np.linspace(K ** (1 / p), 1, num=n) ** p).round().astype(np.int64)]


def check_int(who: str, name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (numpy integers too; never a bool or a float)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{who}: {name} must be an int {bounds}, got {value!r}")
    return int(value)


def snapshot_interval(period: int, ctx: int) -> int:
    """Calls between snapshots; ``period`` must be a multiple of ``ctx`` (never silently rounded)."""
    if period % ctx:
        lower = period // ctx * ctx or ctx
        raise ValueError(
            f"NiNo: period ({period}) must be a multiple of ctx ({ctx}): snapshots are taken every period // ctx "
            f"steps, e.g. period={lower} or {lower + ctx}"
        )
    return period // ctx
