"""What predicts the parameters: a NiNo checkpoint (GNN or WNN+), a baseline, or any object with the same
interface (``nowcast(graph, states, k, backend=None)``, ``ctx``, ``seq_len``, optionally ``needs_graph`` and
``lpe``)."""

from __future__ import annotations

import logging
import os

import torch

from ..baselines import make_baseline
from ..model import NiNoModel

logger = logging.getLogger(__package__)

_NONE = ("", "none", "None")


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


def is_language_model(module, arch: str | None = None) -> bool:
    """Whether the bundled language-model checkpoint serves ``module``: a transformer architecture nino_fast
    knows (``arch``, else :func:`nino_fast.graph.detect_arch`: GPT-2, Llama, BERT, Qwen3, nanoGPT, ViT) or any
    model with a token embedding (``nn.Embedding``); MLPs, ConvNets and other models get the vision one."""
    from ..graph import detect_arch

    if module is None:
        return arch not in (None, "generic")
    arch = arch or detect_arch(module)[0]
    return arch != "generic" or any(isinstance(m, torch.nn.Embedding) for m in module.modules())


def default_ckpt(module=None, arch: str | None = None):
    """The checkpoint shipped with the package for ``module`` (announced at INFO each time: never a silent
    default): :data:`nino_fast.checkpoints.LM` for transformers and models with token embeddings
    (:func:`is_language_model`), :data:`nino_fast.checkpoints.SMALL` otherwise (and when no module is given)."""
    from ..checkpoints import LM, SMALL

    language = is_language_model(module, arch)
    path = LM if language else SMALL
    what = "a language model / transformer" if language else "not a transformer"
    logger.info(
        "NiNo: no ckpt given; the model is %s: using the bundled checkpoint %s (ckpt='none' runs the base "
        "optimizer alone)",
        what,
        path,
    )
    return path
