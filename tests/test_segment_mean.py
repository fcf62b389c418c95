"""segment_mean_csr (the extension's scaffolding op) against its reference; the extension-missing fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nino_fast.ops import segment_mean_csr, segment_mean_csr_reference

from conftest import needs_ext


def _csr(n, e, heavy=0):
    dst = torch.randint(0, max(n, 1), (e,))
    if heavy:
        dst = torch.cat((dst, torch.full((heavy,), n // 2)))
    dst = dst.sort().values if n else dst[:0]
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    if n:
        rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return rowptr


@needs_ext
@pytest.mark.parametrize("n, e, d, heavy", [(0, 0, 4, 0), (5, 0, 3, 0), (1, 1, 1, 0), (40, 500, 33, 0),
                                            (10, 50, 8, 100_000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(n, e, d, heavy, dtype):
    rowptr = _csr(n, e, heavy)
    src = torch.randn(int(rowptr[-1]), d, dtype=dtype)
    got = torch.ops.nino_fast.segment_mean_csr(src, rowptr)
    torch.testing.assert_close(got, segment_mean_csr_reference(src, rowptr))


@needs_ext
def test_noncontiguous_and_deterministic():
    rowptr = _csr(30, 400)
    src = torch.randn(16, 400).t()
    a = segment_mean_csr(src, rowptr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = segment_mean_csr(src, rowptr)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, segment_mean_csr_reference(src.contiguous(), rowptr))


@needs_ext
@pytest.mark.parametrize(
    "src, rowptr, match",
    [(torch.zeros(3, 2), torch.tensor([0, 3], dtype=torch.int32), "rowptr must be Long"),
     (torch.zeros(3), torch.tensor([0, 3]), "src must be 2-D"),
     (torch.zeros(3, 2), torch.tensor([0, 2]), "must start at 0 and end at E=3"),
     (torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 3]), "floating point")],
)
def test_errors_name_op_and_argument(src, rowptr, match):
    with pytest.raises(RuntimeError, match=f"nino_fast::segment_mean_csr: .*{match}"):
        torch.ops.nino_fast.segment_mean_csr(src, rowptr)


@needs_ext
def test_compiles_without_graph_break():
    rowptr = _csr(8, 40)
    src = torch.randn(40, 4)
    fn = torch.compile(lambda s: segment_mean_csr(s * 2, rowptr) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(src), segment_mean_csr_reference(src * 2, rowptr) + 1)


def test_fallback_without_extension():
    """With the extension disabled, import works, one warning is logged, and every op and the model still run."""
    code = (
        "import logging, io, torch\n"
        "buf = io.StringIO(); logging.basicConfig(stream=buf, level=logging.WARNING)\n"
        "import nino_fast\n"
        "from nino_fast.ops import segment_mean_csr, dispatch\n"
        "import nino_fast._extension as e\n"
        "assert not e.has_ext() and dispatch.BACKENDS[-1] == 'reference' and 'cpu' not in dispatch.BACKENDS\n"
        "out = segment_mean_csr(torch.ones(3, 2), torch.tensor([0, 2, 2, 3]))\n"
        "assert out.tolist() == [[1, 1], [0, 0], [1, 1]]\n"
        "import nino_fast.model, nino_fast.plan\n"
        "assert buf.getvalue().count('C++ extension not loaded') == 1, buf.getvalue()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NINO_FAST_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
