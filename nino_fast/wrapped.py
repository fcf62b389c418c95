"""The user's module inside the wrappers that training stacks put around it.

``torch.compile`` returns an ``OptimizedModule`` whose parameters are named ``_orig_mod.*``; DDP and
DataParallel name them ``module.*``; PEFT's ``PeftModel`` hides the transformers model (and its config) under
``base_model.model``. The neural graph must be built from the module the user wrote: its class tells the
architecture (attention heads) and its parameter names are the ones the graph builders know. The parameter
*objects* are the same through every wrapper, so unwrapping changes names, never what is written.
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_model"]


def _inner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module one wrapper holds, or None when ``module`` is not a wrapper we know."""
    orig = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, torch.nn.Module):
        return orig
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return module.module
    cls = type(module)
    # PEFT: get_base_model() is the transformers model with the adapter layers injected into it
    if cls.__module__.startswith("peft") and callable(getattr(module, "get_base_model", None)):
        inner = module.get_base_model()
        return inner if inner is not module else None
    return None


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """Strip ``torch.compile``, DDP / DataParallel and PEFT wrappers (nested in any order).

    >>> unwrap_model(torch.compile(torch.nn.Linear(2, 2))).__class__.__name__
    'Linear'
    """
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = _inner(module)
        if inner is None:
            return module
        module = inner
    return module
