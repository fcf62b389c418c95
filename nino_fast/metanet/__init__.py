"""Metanetworks on the fused kernels: graph neural networks over neural graphs that predict a trained model's
properties from its weights (NG-GNN, Kofinas et al. 2024; Graph Metanetworks, Lim et al. 2024).

- :class:`MetaNet`: node/edge encoders, ``EdgeFiLMConv`` + ``EdgeUpdate`` layers of :mod:`nino_fast.nn`, a
  readout (mean / sum / attention pooling over nodes and edges) and a head; equivariant to permutations of hidden
  neurons by construction; ``MetaNet.load(path).predict(module_or_state_dict)``.
- :mod:`.zoo`: a zoo of MLPs and ConvNets trained on sklearn digits, with held-out test accuracies and splits by
  model; :mod:`.statnn`: the StatNN baseline; :mod:`.train`: training and evaluation; :mod:`.permute`:
  hidden-neuron permutations of sequential models.
- Command line: ``nino-fast metanet zoo|train|eval``.
"""

from .features import GraphBatch, GraphInput, collate, graph_input
from .model import MetaNet
from .permute import permute_hidden
from .statnn import StatNN
from .train import TrainConfig, evaluate, train_metanet
from .zoo import build_model, build_zoo, load_zoo, model_from

__all__ = [
    "GraphBatch",
    "GraphInput",
    "MetaNet",
    "StatNN",
    "TrainConfig",
    "build_model",
    "build_zoo",
    "collate",
    "evaluate",
    "graph_input",
    "load_zoo",
    "model_from",
    "permute_hidden",
    "train_metanet",
]
