"""Boolean environment switches (``NINO_FAST_DISABLE_EXT``, ``NINO_FAST_LPE_CACHE``, ``NINO_FAST_KEEP_FREED``,
``NINO_FAST_FUSED_BACKWARD``), read one way everywhere: unset or empty means the default; ``0``, ``false``, ``no``,
``off`` (any case, surrounding spaces ignored) mean off; any other value means on."""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: ``default`` when unset or empty, False for 0/false/no/off, True otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF
