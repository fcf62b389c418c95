"""Hidden-neuron permutations of sequential models: the symmetry a metanetwork must respect.

Permuting the output units of a ``Linear`` / the output channels of a ``Conv2d`` (rows of its weight, its bias,
the channels of a following ``BatchNorm`` including running statistics, or the units of a ``LayerNorm``), and the
input units / channels of the next ``Linear`` / ``Conv2d`` the same way, gives a model that computes the same
function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Conv2d)
_CHANNEL_WISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def permute_hidden(model: nn.Sequential, generator: torch.Generator | None = None) -> nn.Sequential:
    """A copy of ``model`` (an ``nn.Sequential`` of ``Linear`` / ``Conv2d`` layers, BatchNorms, LayerNorms,
    activations, pooling and flattening) with the hidden units between every two consecutive weighted layers randomly
    permuted. Inputs and outputs keep their order. TypeError for another kind of model."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"permute_hidden: model must be an nn.Sequential, got {type(model).__name__}")
    out = copy.deepcopy(model)
    layers = list(out)
    weighted = [i for i, m in enumerate(layers) if isinstance(m, _WEIGHTED)]
    with torch.no_grad():
        for a, b in zip(weighted[:-1], weighted[1:], strict=True):
            width = layers[a].weight.shape[0]
            perm = torch.randperm(width, generator=generator)
            _permute_out(layers[a], perm)
            for m in layers[a + 1 : b]:
                if isinstance(m, _CHANNEL_WISE):
                    _permute_channels(m, perm)
            nxt = layers[b]
            if nxt.weight.shape[1] != width:
                raise TypeError(
                    f"permute_hidden: layer {b} takes {nxt.weight.shape[1]} inputs, layer {a} gives {width} units "
                    "(only models whose consecutive weighted layers connect unit to unit)"
                )
            nxt.weight.copy_(nxt.weight[:, perm])
    return out


def _permute_out(layer: nn.Module, perm: torch.Tensor) -> None:
    layer.weight.copy_(layer.weight[perm])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[perm])


def _permute_channels(norm: nn.Module, perm: torch.Tensor) -> None:
    if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) != (perm.numel(),):
        raise TypeError(
            f"permute_hidden: LayerNorm{tuple(norm.normalized_shape)} does not normalise the {perm.numel()} units"
        )
    for t in (norm.weight, norm.bias, getattr(norm, "running_mean", None), getattr(norm, "running_var", None)):
        if t is not None:
            t.copy_(t[perm])
