"""Access to the official NiNo outputs in ../shared/golden (see its README) and the checkpoints beside them."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("NINO_FAST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN = SHARED / "golden"
CKPTS = SHARED / "checkpoints"
CASES = ("mlp", "mlp_wnn", "convnet", "gpt2", "gpt2_posw", "llama", "qwen3", "bert", "vit", "nanogpt")
ARCH = {"mlp": "generic", "mlp_wnn": "generic", "convnet": "generic", "gpt2_posw": "gpt2"}


def load(case: str) -> dict:
    path = GOLDEN / f"{case}.npz"
    if not path.is_file():  # a missing golden must fail, never skip: it is what the suite is checked against
        pytest.fail(f"golden file {path} is missing (set NINO_FAST_SHARED to the shared/ folder)")
    d = np.load(path)
    out = {k: d[k] for k in d.files}
    out["named"] = [
        (str(n), tuple(int(x) for x in str(s).split(","))) for n, s in zip(d["names"], d["shapes"], strict=True)
    ]
    out["kwargs"] = ast.literal_eval(str(d["graph_kwargs"]))
    out["arch"] = ARCH.get(case, case)
    out["lpe_t"] = torch.from_numpy(d["lpe"]) if d["lpe"].size else 0
    out["ckpt_path"] = CKPTS / str(d["ckpt"])
    return out


def ckpt(name: str) -> Path:
    path = CKPTS / name
    if not path.is_file():
        pytest.fail(f"checkpoint {path} is missing (set NINO_FAST_SHARED to the shared/ folder)")
    return path
