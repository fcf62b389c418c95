"""Host-side helpers shared by the Triton launchers: input checks, layouts, dot precision, block sizes.

Nothing here reads tensor *values*: every check is on shapes, dtypes and devices, so a launch never forces a
device-to-host synchronisation (rowptr is trusted to start at 0 and end at E, as the spec says).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# fp32 inputs: "ieee" (exact fp32 FMA dots; matches the reference to ~1e-6) or "tf32x3" (three TF32
# tensor-core products; ~fp32 accuracy, faster on Hopper). Low-precision inputs always use bf16/fp16 tensor
# cores.
FP32_PRECISION = os.environ.get("NINO_FAST_TRITON_FP32", "ieee")
if FP32_PRECISION not in ("ieee", "tf32x3"):
    raise ValueError(f"NINO_FAST_TRITON_FP32 must be 'ieee' or 'tf32x3', got {FP32_PRECISION!r}")


# ----------------------------------------------------------------------------------------------------- checks
def _fmt(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(op: str, name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """``t`` is a floating tensor of ``shape`` (``None`` entries match anything) on ``device``."""
    _check(op, name, t, shape, device, FLOAT_DTYPES, "float32, bfloat16 or float16")


def check_index(op: str, name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """``t`` is an int32/int64 tensor of ``shape`` on ``device``."""
    _check(op, name, t, shape, device, INDEX_DTYPES, "int32 or int64")


def _check(op, name, t, shape, device, dtypes, dtype_names):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {dtype_names}, got {t.dtype}")
    _check_shape_device(op, name, t, shape, device)


def _check_shape_device(op, name, t, shape, device):
    if t.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape, strict=True)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{op}: {name} must have shape {want}, got {_fmt(t)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (the device of feat), got {_fmt(t)}")


def check_pair(op: str, a_name: str, a, b_name: str, b) -> None:
    """Optional inputs that only make sense together (both given or both None)."""
    if (a is None) != (b is None):
        raise ValueError(
            f"{op}: {a_name} and {b_name} must be given together (got {a_name}="
            f"{'None' if a is None else 'tensor'}, {b_name}={'None' if b is None else 'tensor'})"
        )


def check_device(op: str, feat: torch.Tensor) -> None:
    if feat.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {feat.device}")


def check_feat(op: str, feat: torch.Tensor) -> tuple[torch.device, int, int]:
    """The leading argument of every op: feat (E, C) on a device Triton runs on. Returns (device, E, C)."""
    check_device(op, feat)
    check_float(op, "feat", feat, (None, None), feat.device)
    return (feat.device, *feat.shape)


def check_csr(
    op: str, feat: torch.Tensor, rowptr: torch.Tensor, src: torch.Tensor
) -> tuple[torch.device, int, int, int]:
    """feat (E, C) and the destination-sorted CSR graph of the CSR ops: rowptr (N + 1,), src (E,). Returns
    (device, E, C, N)."""
    dev, e, c = check_feat(op, feat)
    n = rowptr.numel() - 1
    check_index(op, "rowptr", rowptr, (n + 1,), dev)
    check_index(op, "src", src, (e,), dev)
    return dev, e, c, n


# ---------------------------------------------------------------------------------------------------- layouts
def rowmajor(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride along its last dimension. The kernels take the other strides as arguments, so
    a row-sliced view is passed as is; a transposed one is copied once (strided gathers are uncoalesced)."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1:
        return t
    return t.contiguous()


def vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """1-D index / bias tensors are read with unit stride."""
    return None if t is None else t.contiguous()


def mat(t: torch.Tensor) -> tuple:
    """A 2-D operand as the kernels take it: ``(ptr, stride_row, stride_col)``."""
    return (t, t.stride(0), t.stride(1))


def edge_layer(weight_a, bias_a, etype, type_table, node_src, node_dst, index) -> tuple:
    """The edge layer ``act(W_a e + b_a + table[etype] + node_src[s] + node_dst[d])`` that edge_mlp and
    edge_film_mean share, as their one ``edge`` argument: W_a, b_a, the type index (``index`` stands in when there
    is no table) and the three gathered tables."""
    has_tab = type_table is not None
    return (
        mat(weight_a),
        bias_a,
        etype if has_tab else index,
        table(type_table, bias_a),
        table(node_src, bias_a),
        table(node_dst, bias_a),
    )


def table(t: torch.Tensor | None, absent: torch.Tensor) -> tuple:
    """A gathered row table as the kernels take it, ``(ptr, stride_row)`` (unit column stride, see ``rowmajor``);
    an absent optional table is ``(absent, 0)``, never read (its HAS_* flag is off)."""
    return (absent, 0) if t is None else (t, t.stride(0))


# ----------------------------------------------------------------------------------------------- dot settings
def dot_dtype(*ts: torch.Tensor) -> tl.dtype:
    """Operand dtype of the tensor-core products: the first low-precision dtype among ``ts`` (feat, then the
    weights), else float32 (IEEE / tf32x3 dots)."""
    for t in ts:
        if t is not None and t.dtype in (torch.bfloat16, torch.float16):
            return _TL_DTYPE[t.dtype]
    return tl.float32


def dot_precision() -> str:
    return FP32_PRECISION


def dot_args(*ts: torch.Tensor) -> tuple:
    """The kernels' constexpr ``DOT`` for operands ``ts`` (feat, then the weights): (operand dtype, fp32
    precision, emulate in the interpreter), as ``tiles.mm`` reads it."""
    return (dot_dtype(*ts), dot_precision(), INTERPRET)


# ------------------------------------------------------------------------------------------------ block sizes
def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo): tile widths (tl.dot needs K >= 16 for 16-bit operands)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def k_step(c: int) -> int:
    """K step over the C input columns: 16 (one bf16 MMA step; keeps the fp32 FMA dots' operands small and
    pads C = 45 to 48, not 64)."""
    return 16


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: only sets the split granularity of long rows


def split_chunk(num_edges: int, device: torch.device, block_e: int, chunk: int | None = None) -> int:
    """Edges per work item of the CSR reductions (a power of two, at least 4 ``block_e``).

    Rows with more in-edges than this are split into fixed windows of the edge array (see csr_split.py).
    About 16 items per SM keeps the GPU busy when one row holds most edges; 4096 caps a row program's loop.
    """
    if chunk is not None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        return int(chunk)
    target = triton.cdiv(max(num_edges, 1), 16 * num_sms(device))
    return int(min(4096, max(4 * block_e, 256, triton.next_power_of_2(target))))
