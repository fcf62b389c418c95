"""The step itself: every input checked before any work (device, snapshots, output), then the history read
tensor by tensor, one NiNo prediction, and the prediction written in the input's format."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..optim import k_schedule, load_predictor
from .errors import StepError
from .files import Snapshot, check_series, load_snapshot
from .order import ModelSpec, compile_exclude, model_spec, order_snapshots, parse_step
from .write import check_out, write_prediction


def nowcast_checkpoints(
    paths,
    out,
    nino,
    k=None,
    period=None,
    max_train_steps=None,
    step=None,
    k_decay=2.0,
    arch=None,
    num_heads=None,
    num_key_value_heads=None,
    exclude=None,
    device="cpu",
    config=None,
    order_from=None,
) -> dict:
    """Apply one NiNo step to the snapshots ``paths`` (sorted by step number when all names have one, else
    oldest first as given), write the prediction to ``out``; return a summary. Raises :class:`StepError` for
    every problem with the inputs or the output."""
    device = check_device(device)
    compile_exclude(exclude)
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise StepError(f"{', '.join(missing)}: no such file or directory")
    paths = order_snapshots(paths)
    out = Path(out)
    predictor = load_predictor(nino, ctx=len(paths))
    if predictor is None:
        raise StepError("--nino is required (a NiNo checkpoint path, 'linefit' or 'linefit+')")
    if len(paths) != predictor.ctx:
        raise StepError(f"{type(predictor).__name__} takes ctx={predictor.ctx} snapshots, got {len(paths)}")
    snaps = [load_snapshot(p) for p in paths]
    check_out(out, snaps, [nino if isinstance(nino, (str, os.PathLike)) else None, config, order_from])
    check_series(snaps)
    last = snaps[-1]
    k = resolve_k(k, period, max_train_steps, step, int(predictor.seq_len), k_decay, last.path)
    spec = model_spec(last, config, order_from, exclude, arch, num_heads, num_key_value_heads)
    pred = _predict(predictor, spec, snaps, k, device)
    write_prediction(last, split_prediction(pred, spec), out)
    return dict(
        k=k,
        num_params=int(pred.numel()),
        num_tensors=len(spec.named),
        out=str(out),
        predictor=type(predictor).__name__,
        format=last.kind,
        order=spec.order_from,
        snapshots=[str(p) for p in paths],
    )


def check_device(device) -> torch.device:
    """A device the NiNo model can run on, checked before any work (torch's own errors name no option)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise StepError(f"--device {device!r}: not a torch device (expected e.g. 'cpu', 'cuda', 'cuda:0')") from exc
    if dev.type == "meta":
        raise StepError(f"--device {device!r}: the meta device holds no data; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StepError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StepError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:
            raise StepError(f"--device {device!r}: not usable here ({type(exc).__name__}: {exc})") from exc
    return dev


def resolve_k(
    k: int | None,
    period: int | None,
    max_train_steps: int | None,
    step: int | None,
    seq_len: int,
    decay: float,
    last: Path,
) -> int:
    """Explicit ``k``, or the wrapper's schedule at the last snapshot's step (``step`` optimizer steps done,
    i.e. the NiNo step replaces step number ``step``: index ``(step - 1) // period``, as
    :class:`~nino_fast.NiNo`)."""
    if k is not None:
        if period is not None or max_train_steps is not None:
            raise StepError("give either --k or --period/--max-train-steps, not both")
        return k
    if period is None or max_train_steps is None:
        raise StepError("give --k, or --period and --max-train-steps")
    if step is None:
        step = parse_step(last)
        if step is None:
            raise StepError(f"cannot parse the training step from {last.name!r}; give --step")
    sched = k_schedule(seq_len, max_train_steps, period, decay)
    return sched[min(len(sched) - 1, max(step - 1, 0) // period)]


def _predict(predictor, spec: ModelSpec, snaps: list[Snapshot], k: int, device) -> torch.Tensor:
    """The flat float32 prediction, on the CPU (the graph is built only for predictors that use one)."""
    graph = None
    if getattr(predictor, "needs_graph", True):
        from ..graph import build_graph

        try:
            graph = build_graph(spec.named, lpe=int(predictor.lpe), **spec.graph_args)
        except ValueError as exc:
            raise StepError(f"cannot build the neural graph (parameter order from {spec.order_from}): {exc}") from exc
        if isinstance(predictor, torch.nn.Module):
            predictor.to(device)
    states = read_history(snaps, spec)
    try:
        pred = predictor.nowcast(graph, states, k)
    except ValueError as exc:
        raise StepError(f"the NiNo prediction failed: {exc}") from exc
    return pred.detach().to("cpu")


def read_history(snaps: list[Snapshot], spec: ModelSpec) -> torch.Tensor:
    """(P, ctx) float32 history, oldest first, parameters in graph order; filled one tensor at a time, so only
    the history (not the snapshots) is in memory."""
    rows, total = _rows(spec)
    states = torch.empty(total, len(snaps))
    for j, snap in enumerate(snaps):
        for name, _, span in rows:
            states[span, j] = snap.get(spec.read_as.get(name, name)).reshape(-1)
    return states


def split_prediction(pred: torch.Tensor, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` float32 views of the flat prediction (no copy); every alias is the very tensor of the
    parameter it is tied to (written as one tensor, which torch saves as one storage)."""
    rows, _ = _rows(spec)
    out = {name: pred[span].view(shape) for name, shape, span in rows}
    for alias, name in spec.aliases.items():
        out[alias] = out[name]
    return out


def _rows(spec: ModelSpec) -> tuple[list[tuple[str, tuple[int, ...], slice]], int]:
    """Each parameter's ``(name, shape, rows)`` in the flat ``(P, ...)`` layout, in graph order, and ``P``: the
    one layout shared by the history and the prediction."""
    rows, off = [], 0
    for name, shape in spec.named:
        n = math.prod(shape)
        rows.append((name, shape, slice(off, off + n)))
        off += n
    return rows, off
