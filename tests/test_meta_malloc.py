"""nino_fast.meta._malloc: the meta-training processes keep freed memory for reuse (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt (Linux)")


def test_keep_freed_memory_avoids_refaulting():
    """After keep_freed_memory(), a large tensor freed and allocated again reuses the heap's pages instead of a
    fresh mmap (whose every page faults again): far fewer minor page faults over a loop, same values."""
    code = (
        "import resource, sys, torch\n"
        "from nino_fast.meta._malloc import keep_freed_memory\n"
        "if sys.argv[1] == '1': assert keep_freed_memory()\n"
        "torch.empty(16 << 20).fill_(1.0)\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): t = torch.empty(16 << 20); t.fill_(2.0); assert float(t[-1]) == 2.0; del t\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
    )
    faults = {}
    for mode in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    # 64 MiB per allocation = 16K pages: ~10 x 16K faults without; with, at most one allocation's worth
    assert faults["1"] * 4 < faults["0"], faults


def test_keep_freed_memory_opt_out(monkeypatch):
    from nino_fast.meta._malloc import keep_freed_memory

    monkeypatch.setenv("NINO_FAST_KEEP_FREED", "0")
    assert keep_freed_memory() is False
