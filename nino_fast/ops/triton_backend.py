"""Triton backend: host launchers for triton_kernels/fused.py, wrapped as ``torch.library.custom_op``s.

Each op ``nino_fast::triton_<name>`` has a fake implementation, so torch.compile traces callers without graph
breaks. Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
Float inputs may be fp32 (IEEE dots, matches the reference to ~1e-6) or bf16/fp16 (tensor cores, fp32
accumulation); outputs are fp32.
"""

from __future__ import annotations

import os

import torch

import triton

try:
    from ..triton_kernels import fused
except ImportError:  # a source checkout that was not pip-installed: the kernels live in ./triton_kernels
    import importlib.util
    from pathlib import Path

    _path = Path(__file__).resolve().parents[2] / "triton_kernels" / "fused.py"
    _spec = importlib.util.spec_from_file_location("nino_fast_triton_fused", _path)
    fused = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(fused)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return torch.cuda.is_available() or INTERPRET


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _wt(w: torch.Tensor, k_pad: int, n_pad: int, dtype) -> torch.Tensor:
    """W (N, K) -> W^T zero-padded to (k_pad, n_pad), contiguous."""
    out = torch.zeros(k_pad, n_pad, dtype=dtype, device=w.device)
    out[: w.shape[1], : w.shape[0]] = w.t().to(dtype)
    return out


def _f32(t):
    return None if t is None else t.float().contiguous()


def _setup(feat):
    low = feat.dtype in (torch.bfloat16, torch.float16)
    return (feat.dtype if low else torch.float32), not low


def _dummy(device):
    return torch.zeros(1, device=device)


@torch.library.custom_op("nino_fast::triton_film_mean", mutates_args=())
def film_mean(feat: torch.Tensor, rowptr: torch.Tensor, src: torch.Tensor, node_dst: torch.Tensor,
              node_src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, etype: torch.Tensor | None = None,
              type_table: torch.Tensor | None = None) -> torch.Tensor:
    n, d = rowptr.numel() - 1, node_dst.shape[1]
    out = torch.zeros(n, d, dtype=torch.float32, device=feat.device)
    if n == 0 or d == 0:
        return out
    wdt, ieee = _setup(feat)
    c = feat.shape[1]
    bc, bd = _p2(c), _p2(d)
    w = weight.float()
    tab = _f32(type_table)
    has_tab = tab is not None
    dummy = _dummy(feat.device)
    fused.film_mean_kernel[(n,)](
        feat.to(wdt).contiguous(), rowptr.contiguous(), src.contiguous(), _f32(node_dst), _f32(node_src),
        _wt(w[:d], bc, bd, wdt), _f32(bias[:d]), _wt(w[d:], bc, bd, torch.float32), _f32(bias[d:]),
        etype.contiguous() if has_tab else dummy, tab[:, :d].contiguous() if has_tab else dummy,
        tab[:, d:].contiguous() if has_tab else dummy, out, c, d, HAS_TAB=has_tab, BLOCK_E=32, BLOCK_C=bc,
        BLOCK_D=bd, IEEE=ieee)
    return out


@film_mean.register_fake
def _(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None):
    return feat.new_empty(rowptr.shape[0] - 1, node_dst.shape[1], dtype=torch.float32)


@torch.library.custom_op("nino_fast::triton_edge_film_mean", mutates_args=())
def edge_film_mean(feat: torch.Tensor, rowptr: torch.Tensor, src: torch.Tensor, weight_a: torch.Tensor,
                   bias_a: torch.Tensor, etype: torch.Tensor | None, type_table: torch.Tensor | None,
                   node_src: torch.Tensor, node_dst: torch.Tensor, msg_dst: torch.Tensor, msg_src: torch.Tensor,
                   weight_scale: torch.Tensor, bias_scale: torch.Tensor, weight_shift: torch.Tensor,
                   bias_shift: torch.Tensor) -> torch.Tensor:
    n, d = rowptr.numel() - 1, weight_scale.shape[0]
    out = torch.zeros(n, d, dtype=torch.float32, device=feat.device)
    if n == 0 or d == 0:
        return out
    wdt, ieee = _setup(feat)
    c, dh = feat.shape[1], weight_a.shape[0]
    bc, bh, bd = _p2(c), _p2(dh), _p2(d)
    has_tab = type_table is not None
    dummy = _dummy(feat.device)
    fused.edge_film_mean_kernel[(n,)](
        feat.to(wdt).contiguous(), rowptr.contiguous(), src.contiguous(), _wt(weight_a.float(), bc, bh, wdt),
        _f32(bias_a), etype.contiguous() if has_tab else dummy, _f32(type_table) if has_tab else dummy,
        _f32(node_src), _f32(node_dst), _f32(msg_dst), _f32(msg_src), _wt(weight_scale.float(), bh, bd, wdt),
        _f32(bias_scale), _wt(weight_shift.float(), bh, bd, torch.float32), _f32(bias_shift), out, c, dh, d,
        HAS_TAB=has_tab, BLOCK_E=32, BLOCK_C=bc, BLOCK_H=bh, BLOCK_D=bd, IEEE=ieee)
    return out


@edge_film_mean.register_fake
def _(feat, rowptr, src, weight_a, bias_a, etype, type_table, node_src, node_dst, msg_dst, msg_src, weight_scale,
      bias_scale, weight_shift, bias_shift):
    return feat.new_empty(rowptr.shape[0] - 1, weight_scale.shape[0], dtype=torch.float32)


@torch.library.custom_op("nino_fast::triton_edge_mlp", mutates_args=())
def edge_mlp(feat: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, weight_a: torch.Tensor, bias_a: torch.Tensor,
             weight_b: torch.Tensor, bias_b: torch.Tensor, etype: torch.Tensor | None = None,
             type_table: torch.Tensor | None = None, node_src: torch.Tensor | None = None,
             node_dst: torch.Tensor | None = None, node_src2: torch.Tensor | None = None,
             node_dst2: torch.Tensor | None = None, act_out: bool = False) -> torch.Tensor:
    e, dout = feat.shape[0], weight_b.shape[0]
    out = torch.empty(e, dout, dtype=torch.float32, device=feat.device)
    if e == 0 or dout == 0:
        return out
    wdt, ieee = _setup(feat)
    c, dh = feat.shape[1], weight_a.shape[0]
    bc, bh, bo = _p2(c), _p2(dh), _p2(dout)
    dummy = _dummy(feat.device)
    has_tab, has_node, has_node2 = type_table is not None, node_src is not None, node_src2 is not None
    block_e = 64
    fused.edge_mlp_kernel[(triton.cdiv(e, block_e),)](
        feat.to(wdt).contiguous(), src.contiguous(), dst.contiguous(), _wt(weight_a.float(), bc, bh, wdt),
        _f32(bias_a), etype.contiguous() if has_tab else dummy, _f32(type_table) if has_tab else dummy,
        _f32(node_src) if has_node else dummy, _f32(node_dst) if has_node else dummy,
        _wt(weight_b.float(), bh, bo, wdt), _f32(bias_b), _f32(node_src2) if has_node2 else dummy,
        _f32(node_dst2) if has_node2 else dummy, out, e, c, dh, dout, HAS_TAB=has_tab, HAS_NODE=has_node,
        HAS_NODE2=has_node2, ACT_OUT=act_out, BLOCK_E=block_e, BLOCK_C=bc, BLOCK_H=bh, BLOCK_O=bo, IEEE=ieee)
    return out


@edge_mlp.register_fake
def _(feat, src, dst, weight_a, bias_a, weight_b, bias_b, etype=None, type_table=None, node_src=None, node_dst=None,
      node_src2=None, node_dst2=None, act_out=False):
    return feat.new_empty(feat.shape[0], weight_b.shape[0], dtype=torch.float32)
