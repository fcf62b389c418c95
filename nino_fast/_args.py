"""argparse types for the command lines' numeric options: a bad value is argparse's usage error (status 2, the
option named), never a traceback or a silently odd run."""

from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    """An ``int`` option that must be ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def float_above(low: float, inclusive: bool = False):
    """A finite ``float`` option that must be ``> low`` (``>= low`` with ``inclusive``)."""
    bound = f"{'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
POSITIVE_FLOAT = float_above(0.0)
NON_NEGATIVE_FLOAT = float_above(0.0, inclusive=True)
