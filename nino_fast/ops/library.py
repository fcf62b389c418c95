"""The NiNo op library: each op of csrc/nino_fast.cpp completed under its one name ``torch.ops.nino_fast.<op>``.

For every fused op (``film_mean``, ``edge_mlp``, ``edge_film_mean``) this module registers, next to the schema:

- a **fake** (shape) function: torch.compile / export trace the op without running a kernel;
- its **autograd** formula (``torch.library.register_autograd``; the maths and the fused CPU backward kernels are
  in :mod:`nino_fast.ops.backward`), so the op itself is differentiable on every device and backend;
- a **kernel per device** (CPU, CUDA) that runs the implementation the backend switch selects
  (:mod:`nino_fast.ops.dispatch`): the compiled kernel registered by the extension (``torch.library.get_kernel``
  keeps it callable), the Triton launcher, or the reference.

``segment_mean_csr`` gets its fake and autograd (it has one implementation per device), ``scaled_history`` (a NiNo
step's input features, CPU kernel; spec :func:`nino_fast.scaling.scaled_history_reference`) its fake. The fused kernels'
backward ops (``<op>_backward``, float32 CPU) get fakes, so traced backward graphs hold them too.

Without the compiled extension the fused ops are defined here from the specification's signatures
(``torch.library.infer_schema`` of :mod:`nino_fast.ops.reference`, equal to the C++ schemas: a test checks it), with
the reference (and Triton) as their implementations: the same op names on every install.

Every call returns ``promote_types(feat.dtype, float32)``: float32 from 16-bit features (the CPU kernels read them
as float32), float64 from float64 features — computed in float64 by the reference on every backend, since the
compiled and Triton kernels compute in float32 (so gradcheck holds through every op).
"""

from __future__ import annotations

import warnings

import torch

from . import backward, dispatch, reference

FUSED_OPS = ("film_mean", "edge_mlp", "edge_film_mean")
_lib = torch.library.Library("nino_fast", "FRAGMENT")


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"nino_fast::{name}", "")
    except RuntimeError:
        return False
    return True


def _out_dtype(feat: torch.Tensor) -> torch.dtype:
    return torch.promote_types(feat.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------- fakes
def _fake_film_mean(feat, rowptr, src, node_dst, node_src, weight, bias, etype=None, type_table=None, feat_index=None):
    return feat.new_empty(rowptr.shape[0] - 1, node_dst.shape[1], dtype=_out_dtype(feat))


def _fake_edge_mlp(
    feat,
    src,
    dst,
    weight_a,
    bias_a,
    weight_b,
    bias_b,
    etype=None,
    type_table=None,
    node_src=None,
    node_dst=None,
    node_src2=None,
    node_dst2=None,
    act_out=False,
    weight_c=None,
    bias_c=None,
    weight_d=None,
    bias_d=None,
):
    last = next(w for w in (weight_d, weight_c, weight_b) if w is not None)
    return feat.new_empty(feat.shape[0], last.shape[0], dtype=_out_dtype(feat))


def _fake_edge_film_mean(feat, rowptr, src, weight_a, bias_a, etype, type_table, node_src, node_dst, msg_dst, *rest):
    return feat.new_empty(rowptr.shape[0] - 1, rest[1].shape[0], dtype=_out_dtype(feat))  # rest[1]: weight_scale


def _fake_segment_mean_csr(src, rowptr):
    op = "nino_fast::segment_mean_csr"
    torch._check(src.dim() == 2, lambda: f"{op}: src must be 2-D, got {src.dim()}-D")
    torch._check(rowptr.dim() == 1, lambda: f"{op}: rowptr must be 1-D, got {rowptr.dim()}-D")
    return src.new_empty(rowptr.shape[0] - 1, src.shape[1])


def _fake_scaled_history(states, slots, rows, scales, ends):
    return states.new_empty(slots.shape[0], states.shape[1], dtype=torch.float32)


_FAKES = {
    "film_mean": _fake_film_mean,
    "edge_mlp": _fake_edge_mlp,
    "edge_film_mean": _fake_edge_film_mean,
    "segment_mean_csr": _fake_segment_mean_csr,
    "scaled_history": _fake_scaled_history,
}


def _fake_backward(name: str):
    """Fake of ``<name>_backward``: a float32 gradient shaped like each input of backward.FUSED_OUTPUTS, (0,) for an
    absent optional input and for feat unless need_feat."""
    schema = getattr(torch.ops.nino_fast, f"{name}_backward").default._schema
    names = [a.name for a in schema.arguments]

    def fake(*args):
        a = dict(zip(names, args, strict=True))
        out = []
        for n in backward.FUSED_OUTPUTS[name]:
            t = a[n]
            absent = t is None or (n == "feat" and not a["need_feat"])
            out.append(a["grad_out"].new_empty((0,) if absent else t.shape, dtype=torch.float32))
        return out

    return fake


# ---------------------------------------------------------------------------------------------- autograd
def _register_autograd(name: str) -> None:
    """The op's backward: :data:`backward.GRADIENTS` ``[name]`` on the saved inputs, gradients mapped back to the
    schema's arguments by name."""
    op = getattr(torch.ops.nino_fast, name).default
    args = op._schema.arguments
    names = [a.name for a in args]
    formula = backward.GRADIENTS[name]

    def setup_context(ctx, inputs, output):
        # trailing arguments left at their defaults are not in ``inputs``: complete them from the schema
        inputs = (*inputs, *(a.default_value for a in args[len(inputs) :]))
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs))
        ctx.others = tuple(None if isinstance(x, torch.Tensor) else x for x in inputs)

    def backward_fn(ctx, gout):
        vals = [o if t is None else t for t, o in zip(ctx.saved_tensors, ctx.others, strict=True)]
        need = {n for n, w in zip(names, ctx.needs_input_grad, strict=False) if w}
        grads = formula(dict(zip(names, vals, strict=True)), need, gout)
        return tuple(grads.get(n) if n in need else None for n in names[: len(ctx.needs_input_grad)])

    torch.library.register_autograd(op, backward_fn, setup_context=setup_context)


def _no_double_backward(name: str) -> None:
    """The backward ops are not differentiable themselves: say so instead of torch's silent-gradient warning."""

    def fail(ctx, *grads):
        raise RuntimeError(f"nino_fast::{name}: double backward is not supported (the backward is closed-form)")

    torch.library.register_autograd(f"nino_fast::{name}", fail, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------- kernels
def _reference_impl(name: str):
    spec = getattr(reference, name)

    def run(*args):
        # Below autograd (the op's formula is the backward): no graph to build through the spec's ops.
        with torch.no_grad():
            return spec(*args)

    return run


def _without_feat_index(name: str):
    """For the implementations that take no ``feat_index`` (CUDA, Triton): ``args -> args`` with ``feat`` gathered
    into CSR order and the (last) ``feat_index`` argument None; None for an op without it."""
    schema = getattr(torch.ops.nino_fast, name).default._schema.arguments
    if schema[-1].name != "feat_index":
        assert all(a.name != "feat_index" for a in schema), f"nino_fast::{name}: feat_index must come last"
        return None

    def strip(args):
        args = (*args, *(a.default_value for a in schema[len(args) :]))  # trailing defaults left out by the caller
        return (reference.csr_feat(args[0], args[-1]), *args[1:-1], None)

    return strip


def _without_readout(name: str):
    """For the implementations that run edge_mlp's first two layers only (CUDA, Triton): ``args -> (args, after)``
    with the readout layers (and act_out) taken out of ``args`` and ``after(out)`` applying them with the
    reference's ops (None when the call has none); None for an op without readout layers."""
    names = [a.name for a in getattr(torch.ops.nino_fast, name).default._schema.arguments]
    if "weight_c" not in names:
        return None
    pos = names.index("act_out")  # the readout layers follow it

    def split(args):
        tail = args[pos + 1 :]
        if all(t is None for t in tail):
            return args, None

        def after(z):
            with torch.no_grad():
                return reference.readout(z, *tail, act_out=args[pos])  # (trailing defaults may be absent)

        return (*args[:pos], False), after

    return split


def _float32(a):
    return a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a


def _register_kernel(name: str, key: str) -> None:
    """The op's kernel for dispatch ``key`` ('CPU' / 'CUDA'): the implementation the switch selects."""
    device = key.lower()
    strip, split = _without_feat_index(name), _without_readout(name)
    impls = {"reference": _reference_impl(name)}
    if device in dispatch.BACKENDS:  # the compiled kernel, kept callable under the kernel registered here
        impls[device] = torch.library.get_kernel(f"nino_fast::{name}", key)
    if dispatch.TRITON is not None and device in dispatch._DEVICE["triton"]:
        launch = dispatch.TRITON.LAUNCHERS[name]  # the op's arguments without feat_index
        impls["triton"] = launch if strip is None else lambda *args: launch(*args[:-1])

    def kernel(keyset, *args):
        choice = dispatch.selected(device)
        want = _out_dtype(args[0])
        if want == torch.float64:  # the kernels compute in float32: float64 (gradcheck) runs the exact spec
            choice = "reference"
        elif choice == "cpu":  # the CPU kernels are float32: 16-bit inputs are computed in float32
            args = tuple(_float32(a) for a in args)
        after = None
        if strip is not None and choice in ("cuda", "triton"):
            args = strip(args)
        if split is not None and choice in ("cuda", "triton"):
            args, after = split(args)
        if choice == device:
            out = impls[device].call_boxed(keyset, *args)
        else:
            out = impls[choice](*args)
        if after is not None:
            out = after(out)
        return out if out.dtype == want else out.to(want)

    with warnings.catch_warnings():  # replacing the extension's kernel by design: not news for the user
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        _lib.impl(name, kernel, key, with_keyset=True)


def _register() -> None:
    for name in FUSED_OPS:
        if not _has_schema(name):  # no extension: the spec's signature is the schema
            _lib.define(name + torch.library.infer_schema(getattr(reference, name), mutates_args=()))
        torch.library.register_fake(f"nino_fast::{name}", _FAKES[name], lib=_lib)
        _register_autograd(name)
        for key in ("CPU", "CUDA"):
            _register_kernel(name, key)
        if _has_schema(f"{name}_backward"):
            torch.library.register_fake(f"nino_fast::{name}_backward", _fake_backward(name), lib=_lib)
            _no_double_backward(f"{name}_backward")
    if _has_schema("segment_mean_csr"):
        torch.library.register_fake("nino_fast::segment_mean_csr", _FAKES["segment_mean_csr"], lib=_lib)
        _register_autograd("segment_mean_csr")
    if _has_schema("scaled_history"):  # a NiNo step's input features: no autograd
        torch.library.register_fake("nino_fast::scaled_history", _FAKES["scaled_history"], lib=_lib)


_register()
