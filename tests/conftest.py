"""Shared test setup: a seed per test (from its node id) and skip marks for optional hardware/backends."""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import settings

from nino_fast import _extension

# No per-example deadline: timings on a shared 2-core machine are noise. On CI (CI=true) the examples are
# derandomized, so a CI failure reproduces locally with CI=true.
settings.register_profile(
    "nino_fast", deadline=None, derandomize=os.environ.get("CI", "").lower() in ("1", "true"), print_blob=True
)
settings.load_profile("nino_fast")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(not _extension.has_ext(), reason="needs the compiled extension nino_fast._C")
needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton")
# A GPU and the extension's CUDA kernels (compiled only when the build found a CUDA torch and nvcc).
needs_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_cuda_ext()),
    reason="needs a GPU and nino_fast._C's CUDA kernels",
)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch/numpy/random from the test's node id: reproducible per test, independent of test order."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield
