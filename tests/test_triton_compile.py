"""The Triton kernels compile for an H100 (sm_90) on any machine: the interpreter used by the CPU tests never
lowers them, so this catches layout / dot-shape / lowering errors without a GPU (see triton_compile_check.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_triton

HERE = Path(__file__).resolve().parent


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver  # noqa: F401
    except ImportError as exc:  # a Triton without the internals the check relies on
        pytest.skip(f"triton internals changed: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "triton_compile_check.py"), "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled 36 kernels for sm_90" in proc.stdout, proc.stdout[-3000:]
