"""Compile every Triton kernel for a GPU target without a GPU, and report its resource use.

    python tests/triton_compile_check.py [--arch 90]

Triton's interpreter (the CPU tests) never lowers a kernel, so layout, dot-shape or lowering errors would
only show on a GPU. This script swaps in a stub driver that reports a CUDA target, runs the real launchers
on small CPU tensors with ``warmup`` compilation instead of launches, and prints registers / spill (local)
bytes / shared memory per kernel from ``cuobjdump -res-usage`` on the produced cubin. It uses Triton internals
(the driver registry, ``JITFunction.run(warmup=True)``): tests/test_triton.py runs it in a subprocess and
skips when they are missing. Not for use under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _StubDriver:
    """Just enough of a CUDA driver for Triton to compile (never to launch)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_all(arch: int = 90) -> list[dict]:
    """Compile the kernels of every op (fp32 / bf16, C = 5 / 45 / 128, a long row) for sm_<arch>."""
    from nino_fast.ops import triton_backend  # noqa: F401  (makes nino_fast.triton_kernels importable)
    from nino_fast.testing import make_inputs
    from nino_fast.triton_kernels import edge_film_mean, edge_mlp, film_mean, utils

    compiled = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, kwargs, kernel))

        return launch

    old_getitem, old_check, old_driver = JITFunction.__getitem__, utils.check_device, driver._active
    driver.set_active(_StubDriver(arch))
    JITFunction.__getitem__ = getitem
    utils.check_device = lambda *args: None  # CPU tensors, no interpreter
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for c in (5, 45, 128):
                a = make_inputs(40, 3000, c, 128, d_out=9, heavy=5000, seed=0, dtype=dtype)
                film_mean.film_mean(
                    a["feat"],
                    a["rowptr"],
                    a["src"],
                    a["nd"],
                    a["ns"],
                    a["W2"],
                    a["b2"],
                    a["etype"],
                    a["table2"],
                )
                edge_film_mean.edge_film_mean(
                    a["feat"],
                    a["rowptr"],
                    a["src"],
                    a["Wa"],
                    a["ba"],
                    a["etype"],
                    a["table"],
                    a["ns"],
                    a["nd"],
                    a["md"],
                    a["ms"],
                    a["Wsc"],
                    a["bsc"],
                    a["Wsh"],
                    a["bsh"],
                )
                edge_mlp.edge_mlp(a["feat"], a["src"], a["dst"], a["Wa"], a["ba"], a["Wb"], a["bb"])
                b = make_inputs(40, 3000, c, 128, seed=1, dtype=dtype)
                edge_mlp.edge_mlp(
                    b["feat"],
                    b["src"],
                    b["dst"],
                    b["Wa"],
                    b["ba"],
                    b["Wb"],
                    b["bb"],
                    b["etype"],
                    b["table"],
                    b["ns"],
                    b["nd"],
                    b["ns2"],
                    b["nd2"],
                    True,
                )
    finally:
        JITFunction.__getitem__, utils.check_device = old_getitem, old_check
        driver._active = old_driver  # reset_active() would look for a real GPU driver
    return [_usage(name, kwargs, kernel) for name, kwargs, kernel in compiled]


def _usage(name, kwargs, kernel) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    row = {
        "kernel": name,
        "num_warps": kernel.metadata.num_warps,
        "shared": kernel.metadata.shared,
        "dot": "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma" if "mma.sync" in kernel.asm["ptx"] else "fma",
        **{k: str(v) for k, v in kwargs.items() if k in ("BLOCK_E", "BLOCK_K", "BLOCK_KH")},
        **({"dot_dtype": str(kwargs["DOT"][0])} if "DOT" in kwargs else {}),
    }
    if cuobjdump.exists():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(kernel.asm["cubin"])
            out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
        if m:
            row.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3)))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton_compile_check: unset TRITON_INTERPRET (it compiles, it does not interpret)")
    rows = compile_all(args.arch)
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    print(f"compiled {len(rows)} kernels for sm_{args.arch}")


if __name__ == "__main__":
    main()
