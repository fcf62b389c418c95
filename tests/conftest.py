"""Shared test setup: a seed per test (from its node id) and skip marks for optional hardware/backends."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from nino_fast import _extension


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_ext = pytest.mark.skipif(not _extension.has_ext(), reason="needs the compiled extension nino_fast._C")
needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield
