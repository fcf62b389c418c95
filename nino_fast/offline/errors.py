"""The one exception of the offline step, shared by every module of it."""

from __future__ import annotations


class StepError(ValueError):
    """A problem with the inputs of the offline step (reported by the CLI without a traceback)."""
