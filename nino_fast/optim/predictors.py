"""What predicts the parameters: a NiNo checkpoint (GNN or WNN+), a baseline, or any object with the same
interface (``nowcast(graph, states, k, backend=None)``, ``ctx``, ``seq_len``, optionally ``needs_graph`` and
``lpe``)."""

from __future__ import annotations

import logging
import os

from ..baselines import make_baseline
from ..model import NiNoModel

logger = logging.getLogger(__package__)

_NONE = ("", "none", "None")
_bundled_said = False


def load_predictor(ckpt, ctx: int | None = None):
    """``ckpt`` (path, NiNoModel, 'linefit', 'linefit+', or any object with ``nowcast/ctx/seq_len``) ->
    predictor; None for 'none' / None / False. ``ctx`` only sets the baselines' context (default 5)."""
    if ckpt is None or ckpt is False or isinstance(ckpt, str) and ckpt in _NONE:
        return None
    if isinstance(ckpt, str) and ckpt.lower().replace("_", "").replace("-", "") in (
        "linefit",
        "linefit+",
        "linefitplus",
    ):
        return make_baseline(ckpt, ctx or 5)
    if isinstance(ckpt, (str, os.PathLike)):
        return NiNoModel.from_checkpoint(ckpt)
    if all(hasattr(ckpt, a) for a in ("nowcast", "ctx", "seq_len")):
        return ckpt
    raise ValueError(
        f"NiNo: ckpt must be a path, a NiNoModel, 'linefit', 'linefit+' or 'none', got {type(ckpt).__name__}"
    )


def default_ckpt():
    """The checkpoint shipped with the package, announced once per process at INFO (never a silent default)."""
    from ..checkpoints import SMALL

    global _bundled_said
    if not _bundled_said:
        logger.info("NiNo: no ckpt given, using the bundled checkpoint %s (ckpt='none' runs the base optimizer)", SMALL)
        _bundled_said = True
    return SMALL
