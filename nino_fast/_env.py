"""Boolean environment switches (``NINO_FAST_DISABLE_EXT``, ``NINO_FAST_LPE_CACHE``, ``NINO_FAST_KEEP_FREED``,
``NINO_FAST_FUSED_BACKWARD``), read one way everywhere: unset or empty means the default; ``0``, ``false``, ``no``,
``off`` (any case, surrounding spaces ignored) mean off; any other value means on. Also :func:`torch_threads`."""

from __future__ import annotations

import contextlib
import os

OFF = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: ``default`` when unset or empty, False for 0/false/no/off, True otherwise."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the ``with`` block, the previous count restored after it (library calls
    such as ``collect``/``train`` must not change the caller's thread count: results of torch's own GEMMs can
    depend on it)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
