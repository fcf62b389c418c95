"""Neural graphs: model parameters as edges between neurons (the official NiNo construction), in CSR form."""

from .blocks import Block
from .build import build_graph, build_graph_layout, config_heads, detect_arch
from .checks import InputTypeError, fingerprint, values_per_edge
from .lpe import block_lpe, compute_lpe, laplacian_eigs, normalized_laplacian
from .neural_graph import NeuralGraph
from .pieces import GraphLayout

__all__ = [
    "Block",
    "GraphLayout",
    "InputTypeError",
    "NeuralGraph",
    "block_lpe",
    "build_graph",
    "build_graph_layout",
    "compute_lpe",
    "config_heads",
    "detect_arch",
    "fingerprint",
    "laplacian_eigs",
    "normalized_laplacian",
    "values_per_edge",
]
