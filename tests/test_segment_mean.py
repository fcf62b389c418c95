"""segment_mean_csr (the extension's scaffolding op) against its reference; compile; the fallback.

The reference (nino_fast.ops.reference.segment_mean) is the specification. Comparisons are made against it
in float64, with per-dtype tolerances; the kernels themselves must be deterministic (bitwise equal across
runs and thread counts, and CPU == CUDA).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nino_fast import _extension
from nino_fast.ops import segment_mean_csr, segment_mean_csr_reference

from conftest import needs_cuda_ext, needs_ext

OP = "nino_fast::segment_mean_csr"
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def random_csr(n: int, e: int, heavy: int = 0) -> torch.Tensor:
    """(n+1,) int64 rowptr of e random edges over n rows, plus ``heavy`` more edges into row n // 2."""
    dst = torch.randint(0, max(n, 1), (e,))
    if heavy:
        dst = torch.cat((dst, torch.full((heavy,), n // 2)))
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    if n:
        rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return rowptr


def expected(src: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """The reference evaluated in float64, rounded to src's dtype."""
    return segment_mean_csr_reference(src.double(), rowptr).to(src.dtype)


def check(src: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    got = torch.ops.nino_fast.segment_mean_csr(src, rowptr)
    assert got.shape == (rowptr.numel() - 1, src.shape[1]) and got.dtype == src.dtype
    assert got.device == src.device
    torch.testing.assert_close(got.cpu(), expected(src.cpu(), rowptr.cpu()), **TOL[src.dtype])
    return got


CASES = {
    "empty graph": (0, 0, 4, 0),
    "rows without edges": (5, 0, 3, 0),
    "one edge": (1, 1, 1, 0),
    "odd D": (40, 500, 33, 0),
    "one row of 100k edges": (10, 50, 8, 100_000),
}


@needs_ext
@pytest.mark.parametrize("n, e, d, heavy", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(n, e, d, heavy, dtype):
    rowptr = random_csr(n, e, heavy)
    check(torch.randn(int(rowptr[-1]), d, dtype=dtype), rowptr)


@needs_ext
@given(
    n=st.integers(0, 60),
    e=st.integers(0, 400),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_random_graphs(n, e, d, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    e = e if n else 0
    dst = torch.randint(0, max(n, 1), (e,), generator=gen)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    if n:
        rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    check(torch.randn(e, d, generator=gen, dtype=dtype), rowptr)


@needs_ext
@pytest.mark.parametrize("layout", ["transposed", "strided rows", "expanded"])
def test_noncontiguous_src(layout):
    rowptr = random_csr(30, 400)
    src = {
        "transposed": torch.randn(16, 400).t(),
        "strided rows": torch.randn(400, 32)[:, ::2],
        "expanded": torch.randn(1, 16).expand(400, 16),
    }[layout]
    assert not src.is_contiguous()
    torch.testing.assert_close(
        segment_mean_csr(src, rowptr), segment_mean_csr(src.contiguous(), rowptr), **TOL[src.dtype]
    )
    check(src, rowptr)


@needs_ext
def test_deterministic_across_runs_and_threads():
    rowptr = random_csr(300, 20_000, heavy=50_000)
    src = torch.randn(int(rowptr[-1]), 24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = segment_mean_csr(src, rowptr)
        torch.set_num_threads(2)
        two = segment_mean_csr(src, rowptr)
        again = segment_mean_csr(src, rowptr)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(two, again)


@needs_ext
@pytest.mark.parametrize(
    "src, rowptr, match",
    [
        (torch.zeros(3, 2), torch.tensor([0, 3], dtype=torch.int32), "rowptr must be Long, got Int"),
        (torch.zeros(3, 2), torch.tensor([[0, 3]]), "rowptr must be 1-D, got shape"),
        (torch.zeros(3, 2), torch.zeros(0, dtype=torch.int64), "rowptr must have N\\+1 >= 1 entries"),
        (torch.zeros(3), torch.tensor([0, 3]), "src must be 2-D, got shape \\[3\\]"),
        (torch.zeros(3, 2), torch.tensor([0, 2]), "rowptr must start at 0 and end at E=3, got 0 and 2"),
        (torch.zeros(3, 2), torch.tensor([1, 3]), "rowptr must start at 0"),
        (torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 3]), "src must be floating point, got Long"),
    ],
    ids=["int32 rowptr", "2-D rowptr", "empty rowptr", "1-D src", "bad end", "bad start", "integer src"],
)
def test_errors_name_op_and_argument(src, rowptr, match):
    with pytest.raises(RuntimeError, match=f"{OP}: {match}"):
        torch.ops.nino_fast.segment_mean_csr(src, rowptr)


@needs_ext
@pytest.mark.parametrize("direct", [False, True], ids=["front end", "torch.ops"])
def test_compiles_without_graph_break(direct):
    torch._dynamo.reset()
    rowptr = random_csr(8, 40)
    src = torch.randn(40, 4)
    op = torch.ops.nino_fast.segment_mean_csr if direct else segment_mean_csr
    fn = torch.compile(lambda s, r: op(s * 2, r) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(src, rowptr), expected(src * 2, rowptr) + 1)


@needs_ext
def test_fake_impl_gives_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.nino_fast.segment_mean_csr(
            torch.empty(7, 5, dtype=torch.float64), torch.empty(4, dtype=torch.long)
        )
    assert out.shape == (3, 5) and out.dtype == torch.float64


def test_cuda_flag_matches_dispatcher():
    """has_cuda_ext() (the build's own flag) agrees with the kernels actually registered."""
    if not _extension.has_ext():
        assert not _extension.has_cuda_ext()
        return
    registered = torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA")
    assert _extension.has_cuda_ext() == registered


def test_cpu_isa():
    """The loaded kernels report their vector ISA; AVX-512 only where this CPU has it (setup.py's probe runs the
    instructions on the build machine), and a build for AVX-512 is refused on a CPU without it."""
    isa = _extension.cpu_isa()
    if not _extension.has_ext():
        assert isa is None
        return
    assert isa in ("avx512", "avx2", "scalar")
    if not _extension.cpu_has_avx512():
        assert isa != "avx512"
    assert _extension._isa_error("avx512", cpu_has_avx512=True) is None
    assert _extension._isa_error("avx2", cpu_has_avx512=False) is None
    assert "NINO_FAST_NO_AVX512=1" in _extension._isa_error("avx512", cpu_has_avx512=False)


@needs_cuda_ext
@pytest.mark.parametrize("n, e, d, heavy", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_reference_and_cpu_bitwise(n, e, d, heavy, dtype):
    rowptr = random_csr(n, e, heavy)
    src = torch.randn(int(rowptr[-1]), d, dtype=dtype)
    gpu = check(src.cuda(), rowptr.cuda())
    # Same summation order and arithmetic as the CPU kernel.
    assert torch.equal(gpu.cpu(), torch.ops.nino_fast.segment_mean_csr(src, rowptr))
    assert torch.equal(gpu, torch.ops.nino_fast.segment_mean_csr(src.cuda(), rowptr.cuda()))


@needs_cuda_ext
def test_cuda_noncontiguous_and_wide():
    rowptr = random_csr(100, 3000).cuda()
    check(torch.randn(64, 3000, device="cuda").t(), rowptr)
    check(torch.randn(3000, 1000, device="cuda"), rowptr)  # many column tiles


@needs_cuda_ext
def test_cuda_device_mismatch_error():
    with pytest.raises(RuntimeError, match=f"{OP}: rowptr must be on cuda:0, got cpu"):
        torch.ops.nino_fast.segment_mean_csr(torch.zeros(3, 2, device="cuda"), torch.tensor([0, 3]))


def test_fallback_without_extension():
    """With the extension disabled: import works, one warning is logged, every op and the model still run."""
    code = (
        "import logging, io, torch\n"
        "buf = io.StringIO(); logging.basicConfig(stream=buf, level=logging.WARNING)\n"
        "import nino_fast\n"
        "from nino_fast.ops import segment_mean_csr, dispatch\n"
        "import nino_fast._extension as e\n"
        "assert not e.has_ext() and not e.has_cuda_ext()\n"
        "assert e.ext_error() == 'disabled by NINO_FAST_DISABLE_EXT', e.ext_error()\n"
        "assert dispatch.BACKENDS[-1] == 'reference' and 'cpu' not in dispatch.BACKENDS\n"
        "out = segment_mean_csr(torch.ones(3, 2), torch.tensor([0, 2, 2, 3]))\n"
        "assert out.tolist() == [[1, 1], [0, 0], [1, 1]]\n"
        "import nino_fast.model, nino_fast.plan\n"
        "assert buf.getvalue().count('C++ extension not loaded') == 1, buf.getvalue()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NINO_FAST_DISABLE_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
