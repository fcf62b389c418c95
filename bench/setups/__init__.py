"""Benchmark setups: one module per op family, each exposing ``OPS`` (the op names it serves) and
``setup(case, backend) -> Setup``; :mod:`bench.run` times them all the same way.

A :class:`Case` is one point of the table (op, E, D, dtype, device); a backend is ``reference`` (the pure-PyTorch
specification), ``cpu`` / ``cuda`` / ``triton`` (our kernels, ``ours`` resolves to the best available),
``compiled`` (``torch.compile`` of the reference, ops only) or ``pyg`` (the same maths as PyG ``MessagePassing``
layers, :mod:`bench.pyg_ref`; torch_geometric is imported only by these setups). Every setup of one case uses
the same graph, inputs and weights (drawn in float64 from the case's seed, then cast), so outputs compare
across backends and dtypes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nino_fast.testing import random_csr

DEGREE = 100  # average in-degree of the random graphs (N = E / 100)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
# max |got - reference| / max |reference| allowed before timing (reference in float64)
TOL = {"fp32": 1e-4, "fp64": 1e-9, "bf16": 5e-2}
MODULES = ("film_mean", "edge_mlp", "edge_film_mean", "segment_mean", "layers")


class Unsupported(Exception):
    """The backend has no implementation of this op (the runner skips the row with the message)."""


@dataclass(frozen=True)
class Case:
    op: str
    edges: int
    dim: int = 128
    edge_dim: int = 128  # C, the width of the input edge features
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0

    @property
    def nodes(self) -> int:
        return max(self.edges // DEGREE, 2)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **kw) -> Case:
        return dataclasses.replace(self, **kw)


@dataclass
class Setup:
    """``fn()`` is the timed call; it returns the tensors the runner checks against the reference (output, and
    the gradients for a training step). ``flops``: the GEMM FLOPs of the minimal formulation (2 per
    multiply-add; the same count for every backend, so GFLOP/s compares speed); ``bytes``: the edge arrays
    read and written once (a lower bound on memory traffic)."""

    fn: Callable[[], object]
    flops: float
    bytes: float


@dataclass
class Graph:
    rowptr: torch.Tensor  # (N+1,) int64, CSR by destination
    src: torch.Tensor  # (E,) int32, CSR order
    dst: torch.Tensor  # (E,) int32, CSR order
    edge_index: torch.Tensor  # (2, E) int64 [src; dst]: CSR order, or shuffled (PyG convention) if asked
    nodes: int


def graph(case: Case, shuffled: bool = False) -> Graph:
    """A random graph with ``case.edges`` edges and average in-degree 100; ``shuffled``: edge_index in random
    order (what a layer receives), else sorted by destination."""
    gen = torch.Generator().manual_seed(case.seed)
    n = case.nodes
    rowptr, src, dst = random_csr(n, case.edges, gen=gen)
    edge_index = torch.stack((src.long(), dst.long()))
    if shuffled:
        edge_index = edge_index[:, torch.randperm(case.edges, generator=gen)]
    dev = case.device
    return Graph(rowptr.to(dev), src.to(dev), dst.to(dev), edge_index.to(dev), n)


def randn(case: Case, *shape: int, salt: int = 1, scale: float = 1.0) -> torch.Tensor:
    """Inputs drawn in float64 from (seed, salt), then cast: the same values at every dtype."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + salt)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(case.device, case.torch_dtype)


def seeded(case: Case, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with weights drawn from the case's seed (float64 on CPU), moved to its device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed + 12345)
        with torch.device("cpu"):
            module = build().double()
    return module.to(case.device, case.torch_dtype)


# The CPU kernels take float32 / float64 features (the GPU backends also bf16).
CPU_DTYPES = ("fp32", "fp64")


def resolve_backend(backend: str, case: Case) -> str:
    """``ours`` -> the best compiled backend for the case's device (cpu, cuda or triton); others unchanged.
    Raises :class:`Unsupported` for a backend that is not available there or lacks the case's dtype."""
    from nino_fast.ops import dispatch

    device = case.device
    if backend == "ours":
        backend = dispatch.resolve(device)
        if backend == "reference":
            raise Unsupported(f"no compiled backend on {device} (available: {dispatch.available_backends(device)})")
    elif backend in ("cpu", "cuda", "triton") and backend not in dispatch.available_backends(device):
        raise Unsupported(f"backend {backend} not available on {device}")
    if backend == "cpu" and case.dtype not in CPU_DTYPES:
        raise Unsupported(f"the cpu kernels take {'/'.join(CPU_DTYPES)} features, not {case.dtype}")
    return backend


def registry() -> dict[str, object]:
    """op name -> the setup module serving it."""
    ops = {}
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        ops.update(dict.fromkeys(module.OPS, module))
    return ops


def op_call(name: str, backend: str):
    """The op ``name`` (film_mean, edge_mlp, edge_film_mean) on ``backend``: the dispatcher's front end with
    that backend, or ``torch.compile`` of the reference."""
    from nino_fast.ops import dispatch
    from nino_fast.ops import reference as ref

    if backend == "compiled":
        return torch.compile(getattr(ref, name))
    if backend == "pyg":
        raise AssertionError("the PyG setups build modules, not op calls")
    fn = getattr(dispatch, name)
    return lambda *args: fn(*args, backend=backend)
