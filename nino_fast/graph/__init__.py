"""Neural graphs: model parameters as edges between neurons (the official NiNo construction), in CSR form."""

from .build import build_graph, detect_arch
from .lpe import compute_lpe, laplacian_eigs, normalized_laplacian
from .neural_graph import NeuralGraph

__all__ = ["NeuralGraph", "build_graph", "compute_lpe", "detect_arch", "laplacian_eigs", "normalized_laplacian"]
