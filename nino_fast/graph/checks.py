"""Argument checks shared by graph building and the NiNo step, and the fingerprint of a ``(name, shape)`` list.

Bad input must fail at the call that received it, with a message naming that call, the argument, what was
expected and what came in -- not later as an index error deep inside a kernel, or never (a float dimension
silently truncated, a graph built for another model with the same parameter count silently used).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers

import torch


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError``, and a ``ValueError`` as well so that callers that catch
    ``ValueError`` for bad input (the CLI, the optimizer's ``on_error``) keep catching it."""


def describe(value) -> str:
    """``repr`` and type of a received value, for error messages (``2.0 (float)``)."""
    text = repr(value)
    return f"{text[:80]}... ({type(value).__name__})" if len(text) > 80 else f"{text} ({type(value).__name__})"


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool (``True`` as a head count or horizon is a bug, not 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, torch.Tensor))


def check_int(value, who: str, arg: str, lo: int | None = None, hi: int | None = None) -> int:
    """``int(value)`` if it is an integer in ``[lo, hi]``; else InputTypeError (not an int) / ValueError."""
    span = f" in {lo}..{hi}" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
    if not is_int(value):
        raise InputTypeError(f"{who}: {arg} must be an int{span}, got {describe(value)}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{who}: {arg} must be an int{span}, got {v}")
    return v


def values_per_edge(shape) -> int:
    """The edge-feature slots a parameter tensor of ``shape`` fills in the neural graph: a kernel's spatial size
    ``prod(shape[2:])`` (9 for a 3x3 conv), 1 for vectors and matrices."""
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def check_not_meta(t: torch.Tensor | None, who: str, what: str) -> None:
    """Meta tensors have shapes but no values: fine for building a graph, never for a prediction."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{who}: {what} is on the meta device; load real weights first")


def _shape(value, who: str, i: int, name: str) -> tuple[int, ...]:
    """The shape of entry ``i``: a tensor's (meta is fine: only shapes are read) or a sequence of positive
    ints (``torch.Size``, tuple, list)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if not isinstance(value, (tuple, list, torch.Size)):
        raise InputTypeError(
            f"{who}: named_shapes[{i}] ({name!r}): the shape must be a tuple of positive ints or a tensor, "
            f"got {describe(value)}"
        )
    for d in value:
        if not is_int(d) or d <= 0:
            err = ValueError if is_int(d) else InputTypeError
            raise err(
                f"{who}: unsupported parameter shapes: named_shapes[{i}] ({name!r}) has shape {tuple(value)!r}; "
                f"every dimension must be a positive int, got {describe(d)}"
            )
    return tuple(int(d) for d in value)


def _pairs(model, who: str):
    if isinstance(model, torch.nn.Module):
        return model.named_parameters()
    if isinstance(model, dict):
        return model.items()
    if isinstance(model, (str, bytes, torch.Tensor)) or not hasattr(model, "__iter__"):
        raise InputTypeError(
            f"{who}: expected an nn.Module, a dict or a list of (name, shape) pairs, got {describe(model)}"
        )
    return model


def check_named_shapes(model, who: str = "build_graph") -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape), ...]`` of an ``nn.Module`` (its ``named_parameters()``), a ``{name: tensor or shape}``
    dict or a list of pairs, checked: names unique non-empty strings, dimensions positive ints (no float,
    str or bool silently converted)."""
    out, seen = [], {}
    for i, pair in enumerate(_pairs(model, who)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputTypeError(f"{who}: named_shapes[{i}] must be a (name, shape) pair, got {describe(pair)}")
        name, value = pair
        if not isinstance(name, str) or not name:
            err = ValueError if isinstance(name, str) else InputTypeError
            raise err(f"{who}: named_shapes[{i}]: the name must be a non-empty str, got {describe(name)}")
        if name in seen:
            raise ValueError(f"{who}: duplicate parameter names: {name!r} at named_shapes[{seen[name]}] and [{i}]")
        seen[name] = i
        out.append((str(name), _shape(value, who, i, name)))
    return out


def _digest(named: list[tuple[str, tuple[int, ...]]]) -> str:
    canonical = json.dumps([[n, list(s)] for n, s in named], separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()


def fingerprint(named_shapes) -> str:
    """A stable hash (sha1 hex) of a model's ``(name, shape)`` list, in order: two models get the same
    fingerprint exactly when their parameter names and shapes agree. A graph carries the fingerprint of the
    model it was built for (``NeuralGraph.fingerprint``), so that a graph of another model with the same
    parameter count is refused (``NeuralGraph.check_matches``). Takes what :func:`check_named_shapes` takes."""
    return _digest(check_named_shapes(named_shapes, "fingerprint"))


def first_difference(mine: list, theirs: list) -> str:
    """Where two ``(name, shape)`` lists part: the first differing entry, else their lengths."""
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if tuple(a) != tuple(b):
            return f"parameter #{i} is {a[0]!r} {tuple(a[1])} in the graph, {b[0]!r} {tuple(b[1])} in named_shapes"
    if len(mine) != len(theirs):
        sizes = [sum(math.prod(s) for _, s in x) for x in (mine, theirs)]
        return (
            f"the graph has {len(mine)} parameter tensors ({sizes[0]} parameters), named_shapes has "
            f"{len(theirs)} ({sizes[1]} parameters)"
        )
    return "the names and shapes agree but the graph's fingerprint does not (was graph.param_shapes changed?)"
