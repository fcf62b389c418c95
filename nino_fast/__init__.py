"""nino_fast: fast, exact NiNo (Neuron Interaction and Nowcasting networks, Knyazev et al., ICLR 2025).

    >>> from nino_fast import NiNoModel, build_graph
    >>> graph = build_graph(model)                       # the official neural graph, as CSR
    >>> nino = NiNoModel.from_checkpoint("nino.pt")
    >>> new_params = nino.nowcast(graph, states, k=10)   # states: (n_params, 5) history, oldest first

Graphs or histories too large for memory: ``nino.nowcast(build_graph_layout(model), history, k=10)`` assembles each
tile's edges when it is needed and reads the history tensor by tensor (:mod:`nino_fast.history`).

Training: ``NiNo(torch.optim.AdamW(model.parameters()), model=model, ckpt="nino.pt", period=1000)`` wraps any
optimizer (see :class:`nino_fast.optim.NiNo`); ``Linefit`` / ``LinefitPlus`` are the paper's baselines.
"""

from ._extension import has_cuda_ext, has_ext, release_cpu_buffers
from .baselines import Linefit, LinefitPlus
from .graph import GraphLayout, NeuralGraph, build_graph, build_graph_layout
from .model import NiNoModel
from .optim import NiNo, k_schedule
from .scaling import scale_params, unscale_params

__version__ = "0.1.0"
__all__ = [
    "GraphLayout",
    "Linefit",
    "LinefitPlus",
    "NeuralGraph",
    "NiNo",
    "NiNoModel",
    "build_graph",
    "build_graph_layout",
    "has_cuda_ext",
    "has_ext",
    "k_schedule",
    "release_cpu_buffers",
    "scale_params",
    "unscale_params",
]

# Integrations with optional dependencies, imported on first use (``nino_fast.hf.NiNoCallback`` after
# ``import nino_fast``): importing nino_fast must not import transformers or lightning.
_LAZY_SUBMODULES = ("hf", "lightning")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also sets the attribute: called once per name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
