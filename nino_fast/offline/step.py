"""The step itself: every input checked before any work (device, snapshots, output), then the history read
tensor by tensor, one NiNo prediction, and the prediction written in the input's format."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from pathlib import Path

import torch

from ..graph import values_per_edge
from ..history import TensorHistory
from ..model import NiNoModel
from ..optim import k_schedule, load_predictor
from ..resume import StepState
from ..stream import available_memory, in_memory_bytes, parse_memory, supports_layout
from .errors import StepError
from .files import Snapshot, check_series, load_snapshot
from .order import ModelSpec, compile_exclude, model_spec, order_snapshots, parse_step
from .write import check_out, write_prediction

logger = logging.getLogger(__name__)


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
    history="auto",
    max_memory=None,
    progress=None,
    resume=True,
) -> dict:
    """Apply one NiNo step to the snapshots ``paths`` (sorted by step number when all names have one, else
    oldest first as given), write the prediction to ``out``; return a summary. Raises :class:`StepError` for
    every problem with the inputs or the output.

    ``history``: where the step keeps the parameter history. ``"memory"``: the (P, ctx) float32 history and the
    whole graph in memory (fastest; ~41 bytes per parameter). ``"disk"``: nothing O(P) but the prediction
    (P values in the snapshots' dtype): each tile of the graph is assembled from its layout and its parameters'
    history read from the snapshot files when a pass reaches it (:func:`nino_fast.stream.nowcast_layout`; NiNo
    checkpoints only), bitwise the same prediction. ``"auto"``: disk when the in-memory history and graph would
    take more than half the available memory. ``max_memory``: bytes (or ``"6GB"``) for the step's tiles (see
    ``NiNoModel.nowcast``); ``progress``: a progress bar with ETA (None: on a terminal, for long steps).

    ``resume``: a step with the history on disk (one process) keeps what its passes finish in ``<out>.nino-step/``
    (:class:`~nino_fast.resume.StepState`, removed once the prediction is written); rerunning the same step after an
    interrupt continues from there, bitwise the prediction of an uninterrupted run. ``resume=False`` starts over."""
    device = check_device(device)
    compile_exclude(exclude)
    if max_memory is not None:
        try:
            max_memory = parse_memory(max_memory, "--max-memory")
        except ValueError as exc:
            raise StepError(str(exc)) from exc
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
    check_series(snaps)  # first: what --out must be depends on the snapshots' one format
    check_out(out, snaps, [nino if isinstance(nino, (str, os.PathLike)) else None, config, order_from])
    last = snaps[-1]
    k = resolve_k(k, period, max_train_steps, step, int(predictor.seq_len), k_decay, last.path)
    spec = without_too_wide(
        model_spec(last, config, order_from, exclude, arch, num_heads, num_key_value_heads), predictor
    )
    where = choose_history(history, predictor, spec, len(snaps))
    with _rank_split(where == "disk") as split:
        state = None
        if where == "disk" and split is None:
            state = _step_state(out, snaps, nino, k, device, resume, spec)
        elif split is not None and split.rank == 0:
            logger.info(
                "a step split over %d processes is not resumable: after an interrupt it starts over", split.world
            )
        if where == "disk":
            try:
                pred = _predict_from_disk(predictor, spec, snaps, k, device, max_memory, progress, split, state)
            except StepError:  # bad inputs fail the same way again: nothing to resume
                if state is not None:
                    state.clear()
                raise
        else:
            pred = _predict(predictor, spec, snaps, k, device, max_memory, progress)
        if split is None or split.rank == 0:  # a step split over processes is written once
            write_prediction(last, split_prediction(pred, spec), out)
        if state is not None:
            state.clear()
        return dict(
            history=where,
            rank=split.rank if split else 0,
            ranks=split.world if split else 1,
            peak_rss=_peak_rss(),
            k=k,
            num_params=int(pred.numel()),
            num_tensors=len(spec.named),
            out=str(out),
            predictor=type(predictor).__name__,
            format=last.kind,
            order=spec.order_from,
            snapshots=[str(p) for p in paths],
        )


def without_too_wide(spec: ModelSpec, predictor) -> ModelSpec:
    """``spec`` without the tensors with more values per edge (prod(shape[2:]), a kernel's spatial size) than a NiNo
    checkpoint's edge features hold (9: 3x3 kernels): written as in the last snapshot, said at WARNING (the wrapper
    leaves them to the base optimizer the same way)."""
    limit = getattr(predictor, "max_feat_size", None) if isinstance(predictor, NiNoModel) else None
    wide = {n for n, shape in spec.named if limit is not None and values_per_edge(shape) > limit}
    if not wide:
        return spec
    first = next(n for n, _ in spec.named if n in wide)
    logger.warning(
        "%d tensors have more values per edge than the NiNo checkpoint holds (%d: kernels up to 3x3), e.g. %r; they "
        "are not predicted: the output keeps their values from the last snapshot",
        len(wide),
        limit,
        first,
    )
    named = [(n, shape) for n, shape in spec.named if n not in wide]
    if not named:
        raise StepError(f"no tensor fits the NiNo checkpoint (every one has more than {limit} values per edge)")
    return ModelSpec(
        named,
        {alias: n for alias, n in spec.aliases.items() if n not in wide},
        spec.graph_args,
        spec.order_from,
        {n: alias for n, alias in spec.read_as.items() if n not in wide},
    )


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux / macOS), or None."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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


def choose_history(history: str, predictor, spec: ModelSpec, ctx: int) -> str:
    """``"memory"`` or ``"disk"`` for ``history`` (see :func:`nowcast_checkpoints`); StepError when the
    predictor cannot read its history from disk."""
    if history not in ("auto", "memory", "disk"):
        raise StepError(f"--history must be auto, memory or disk, got {history!r}")
    can_stream = supports_layout(predictor)
    if history == "disk" and not can_stream:
        raise StepError(
            f"--history disk needs a NiNo checkpoint with the official architecture (the folded plan); "
            f"{type(predictor).__name__} reads its history in memory"
        )
    if history != "auto":
        return history
    need = in_memory_bytes(sum(math.prod(shape) for _, shape in spec.named), ctx)
    if can_stream and need > available_memory(torch.device("cpu")) // 2:
        logger.info("history read from disk tile by tile: %.1f GB would not fit in memory", need / 1e9)
        return "disk"
    return "memory"


class SnapshotHistory(TensorHistory):
    """The (P, ctx) history of the snapshot files, one parameter tensor's (n_t, ctx) rows at a time, in the
    snapshots' dtype (float32 when the predicted tensors' dtypes differ)."""

    def __init__(self, snaps: list[Snapshot], spec: ModelSpec):
        names = [spec.read_as.get(name, name) for name, _ in spec.named]
        dtypes = {s.where[n].dtypes[n] for s in snaps for n in names}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if not dtype.is_floating_point or dtype.itemsize > 4 or dtype.itemsize < 2:
            dtype = torch.float32
        super().__init__(spec.named, len(snaps), dtype)
        self.snaps, self.names = snaps, names

    def read(self, t: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = torch.empty(self.offsets[t + 1] - self.offsets[t], self.ctx, dtype=dtype or self.dtype)
        self.read_into(t, rows)
        return rows

    def read_into(self, t: int, rows: torch.Tensor) -> None:
        """Fill ``rows`` (n_t, ctx) with tensor ``t``'s history, one snapshot's tensor at a time beside it."""
        for j, snap in enumerate(self.snaps):
            rows[:, j] = snap.get(self.names[t]).reshape(-1)


@contextlib.contextmanager
def _rank_split(enabled: bool):
    """This process's :class:`~nino_fast.stream.RankSplit` when enabled and the step was launched on several
    processes (``torchrun --nproc-per-node P nino-fast step ...``: ``WORLD_SIZE`` > 1), else None. Joins the
    caller's default process group, or creates one (gloo on CPUs) and destroys it on exit: left to the
    interpreter's shutdown, gloo's teardown sometimes aborted a rank ("terminate called without an active
    exception")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not enabled or world <= 1:
        yield None
        return
    import torch.distributed as dist

    from ..stream import RankSplit

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        yield RankSplit(dist.get_rank(), dist.get_world_size(), dist.all_reduce, local)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def state_dir(out: Path) -> Path:
    """Where an interrupted step to ``out`` keeps its progress."""
    return out.with_name(out.name + ".nino-step")


def _step_state(out: Path, snaps: list[Snapshot], nino, k: int, device, resume: bool, spec: ModelSpec) -> StepState:
    """The :class:`StepState` of this step: what identifies it (the snapshots' files with their sizes and
    modification times, the NiNo checkpoint, k, the device, this version, and the graph: the predicted tensors,
    their ties and the graph options, e.g. --num-heads or --exclude) is its key."""
    from .. import __version__
    from ..graph import fingerprint

    def ident(path: Path) -> list:
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    files = [ident(f.path) for snap in snaps for f in snap.files]
    nino_id = ident(Path(nino)) if isinstance(nino, (str, os.PathLike)) and Path(nino).is_file() else str(nino)
    graph = dict(
        tensors=fingerprint(spec.named),
        aliases=sorted(spec.aliases.items()),
        options={a: v for a, v in sorted(spec.graph_args.items())},
    )
    key = dict(version=__version__, snapshots=files, nino=nino_id, k=k, device=str(device), graph=graph)
    state = StepState(state_dir(out), key, fresh=not resume)
    if state.saved():
        logger.info("resuming an interrupted step from %s (%s saved)", state.root, ", ".join(state.saved()))
    return state


def _predict_from_disk(
    predictor, spec, snaps, k: int, device, max_memory, progress, split=None, state=None
) -> torch.Tensor:
    """The prediction (P,) in the snapshots' dtype, the history read from the files tile by tile."""
    from .. import stream
    from ..graph import build_graph_layout
    from ..history import NonFiniteHistory

    try:
        layout = build_graph_layout(spec.named, lpe=int(predictor.lpe), **spec.graph_args)
    except ValueError as exc:
        raise StepError(f"cannot build the neural graph (parameter order from {spec.order_from}): {exc}") from exc
    predictor.to(device)
    history = SnapshotHistory(snaps, spec)
    try:
        where = "nino-fast step" + (f" (rank {split.rank}/{split.world})" if split else "")
        opts = dict(max_memory=max_memory, progress=progress, split=split, where=where, state=state)
        return stream.nowcast_layout(predictor, layout, history, k, **opts)
    except NonFiniteHistory as exc:
        raise StepError(f"the snapshots cannot be used: {exc}") from exc
    except ValueError as exc:
        raise StepError(f"the NiNo prediction failed: {exc}") from exc


def _predict(predictor, spec: ModelSpec, snaps: list[Snapshot], k: int, device, max_memory, progress) -> torch.Tensor:
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
    opts = dict(max_memory=max_memory, progress=progress) if supports_layout(predictor) else {}
    try:
        pred = predictor.nowcast(graph, states, k, **opts)
    except ValueError as exc:
        raise StepError(f"the NiNo prediction failed: {exc}") from exc
    return pred.detach().to("cpu")


def read_history(snaps: list[Snapshot], spec: ModelSpec) -> torch.Tensor:
    """(P, ctx) float32 history, oldest first, parameters in graph order; filled one tensor at a time, so only
    the history (not the snapshots) is in memory."""
    history = SnapshotHistory(snaps, spec)
    states = torch.empty(history.num_params, history.ctx)
    for t in range(len(spec.named)):
        history.read_into(t, states[history.offsets[t] : history.offsets[t + 1]])
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
