"""One NiNo step on saved model checkpoints (``nino-fast step``): read ctx snapshots, write the predicted one.

Formats (the output has the input's format and layout):

- torch files (``.pt``, ``.pth``, ``.bin``, ...): a state dict ``{name: tensor}``, or a dict holding it under
  ``'state_dict'`` or ``'model'`` (other entries are copied from the last snapshot);
- ``.safetensors`` files (metadata copied from the last snapshot);
- Hugging Face model directories: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, or their
  sharded forms (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` + shards). The output
  directory gets the same shard files and a copy of the index (same names, same shard of each tensor), plus
  the other files of the last snapshot except a Trainer checkpoint's training state (optimizer, scheduler, RNG,
  trainer state) and stale weights files;
- a bare sharded index file (``.../model.safetensors.index.json``): the output (``--out``, a directory) gets
  the index and its shards only.

Memory. Files are opened lazily (safetensors headers, ``torch.load(mmap=True)``) and read one tensor at a
time into the ``(P, ctx)`` float32 history; the snapshots themselves are never held in memory (except torch
files of the legacy, non-zip format, which cannot be memory-mapped). The output is written file by file
(shard by shard).

Order of the snapshots. When every path has a step number (:func:`parse_step`: ``step_1000.pt``,
``checkpoint-1000``, ...; for HF weights/index files, from their directory) the snapshots are sorted by it, so a
shell glob such as ``checkpoint-*`` (lexicographic: 1000 before 200) is fine; equal step numbers are an error.
When some path has none, the given order is kept (oldest first).

Order of the parameters. The neural graph needs the parameters in the model's order. In order of precedence:
a Hugging Face ``config.json`` (``--config``, the model directory's, or the one beside an HF weights/index
file: the model is built on the meta device, no memory, and also gives the architecture, the attention heads
and the tied parameters); ``--order-from`` (a torch state dict of the same model, or a text file with one
parameter name per line); a ``nino_fast_order`` entry in the safetensors metadata (a JSON list of names);
the file order of torch files. Safetensors files and shard indexes keep no order (names come back sorted):
without one of the sources above they are ordered by :func:`module_order_key` only when that order is certain,
i.e. a pure numeric-index ``nn.Sequential`` (``0.weight``, ``0.bias``, ``2.weight``, ...) with a generic graph;
anything else is refused with a :class:`StepError` saying how to give the order (never a silently different
graph).

Which tensors are predicted. With a config, the model's parameters. Otherwise every floating-point tensor of
rank 1-4 except normalisation statistics (``running_mean``, ``running_var``) and names matching ``exclude``;
the graph is built from the ``(name, shape)`` list with ``arch`` / ``num_heads``. Tied parameters are predicted
once (one parameter in the graph, under the model's name) and every stored alias receives the same prediction:
ties come from the config, or for torch files (snapshots or ``--order-from``) from shared storage (torch keeps
aliases as one storage; a torch output keeps them shared). Safetensors files drop aliases, so their ties need the
config (or a torch ``--order-from``); a tie stored under its alias only (``safetensors.torch.save_model``) is read
from that name. Everything else is copied from the last snapshot. Predictions are written in each tensor's stored
dtype.

Writing is atomic: into a temporary file (or directory) beside ``out``, then renamed over it, so a failure leaves
an existing ``out`` untouched; an existing output directory is replaced as a whole, and only when it is empty or
holds a model. ``out`` must not be (a hard link to) an input, nor a directory holding one, and its parent must
exist. Every problem with the inputs or the output raises :class:`StepError` (the CLI: ``error: ...``, exit 2).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .optim import k_schedule, load_predictor

logger = logging.getLogger(__name__)

_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# every weights file of an HF directory (also stale ones next to the file in use): never copied
_HF_WEIGHTS_RE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_STEP_RE = re.compile(r"(?:step|checkpoint|ckpt|iter|iteration|epoch)[-_=]?(\d+)", re.IGNORECASE)
# Trainer checkpoint files that describe the old parameters' optimisation, not the model: not copied
_TRAINING_STATE = re.compile(
    r"(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|nino_state\.pt)$"
)
_BUFFER_RE = re.compile(r"(running_mean|running_var|num_batches_tracked)$")
ORDER_METADATA_KEY = "nino_fast_order"
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HOW_TO_ORDER = (
    "pass --config CONFIG (a Hugging Face config.json, or its directory: the model is built from it) or "
    "--order-from FILE (a torch state dict of the same model, or a text file with one parameter name per "
    "line, in the model's order), or save the snapshots as torch files"
)


class StepError(ValueError):
    """A problem with the inputs of the offline step (reported by the CLI without a traceback)."""


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class TensorFile:
    """One weights file opened lazily: names, shapes and dtypes without reading the data, tensors read one at a
    time (memory-mapped), so ctx snapshots of a large model never sit in memory together."""

    path: Path
    fmt: str  # 'torch' or 'safetensors'
    names: list[str]  # stored order (sorted by name for safetensors)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    read: Callable[[str], torch.Tensor]
    metadata: dict | None = None  # safetensors metadata
    wrapper: dict | None = None  # torch files: the outer dict when the state dict is nested
    wrapper_key: str | None = None
    ties: dict[str, str] = field(default_factory=dict)  # torch files: alias -> first name sharing its storage


@dataclass
class Snapshot:
    """One checkpoint: its weights files and which file holds each tensor (several for sharded checkpoints)."""

    path: Path
    kind: str  # 'torch', 'safetensors', 'hf' (model directory) or 'index' (bare sharded index file)
    files: list[TensorFile]
    where: dict[str, TensorFile]  # tensor name -> its file, in stored order
    index: Path | None = None  # sharded: the index json
    config_dir: Path | None = None  # where a config.json describing the model is, if any

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shapes[name]

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)

    @property
    def ordered(self) -> bool:
        """Whether the stored order is the model's (one torch file: dict order is kept)."""
        return len(self.files) == 1 and self.files[0].fmt == "torch"

    @property
    def ties(self) -> dict[str, str]:
        return {a: n for f in self.files for a, n in f.ties.items()}


def parse_step(path: Path) -> int | None:
    """Training step from a name such as ``step_1000.pt``, ``checkpoint-1000`` or ``ckpt1000.safetensors``;
    for HF weights/index files (``checkpoint-1000/model.safetensors``) the step is their directory's."""
    path = Path(path)
    hits = _STEP_RE.findall(path.name)
    if not hits and _HF_WEIGHTS_RE.match(path.name):
        hits = _STEP_RE.findall(path.resolve().parent.name)
    return int(hits[-1]) if hits else None


def module_order_key(name: str) -> tuple:
    """Sort key approximating registration order from a name alone: module path with numbers compared as
    numbers, then ``weight`` before other leaves before ``bias`` (``0.weight, 0.bias, 2.weight,
    10.weight``)."""
    *module, leaf = name.split(".")
    path = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module)
    return path, {"weight": 0, "bias": 2}.get(leaf, 1), leaf


def _torch_load(path: Path):
    """``torch.load`` memory-mapped (pages read on use); legacy non-zip files cannot be mapped: loaded whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    logger.info("%s: legacy (non-zip) torch file, loaded into memory (re-save it to read it memory-mapped)", path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(path: Path, obj) -> tuple[dict, dict | None, str | None]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, obj, key
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, None, None
    raise StepError(
        f"{path}: expected a state dict (name -> tensor), or a dict with one under 'state_dict' or "
        f"'model'; got {type(obj).__name__}"
    )


def storage_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` of tensors that are the same view of the same storage: tied parameters, which
    torch saves once and loads back shared (a safetensors file cannot keep them)."""
    first: dict[tuple, str] = {}
    ties = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            ties[name] = first[key]
        else:
            first[key] = name
    return ties


def open_torch(path: Path) -> TensorFile:
    try:
        obj = _torch_load(path)
    except Exception as exc:
        raise StepError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    tensors, wrapper, key = _unwrap(path, obj)
    return TensorFile(
        path,
        "torch",
        list(tensors),
        {n: tuple(t.shape) for n, t in tensors.items()},
        {n: t.dtype for n, t in tensors.items()},
        tensors.__getitem__,
        wrapper=wrapper,
        wrapper_key=key,
        ties=storage_ties(tensors),
    )


def open_safetensors(path: Path) -> TensorFile:
    """The header only (names, shapes, dtypes); tensors are read on demand through the open handle."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        slices = {n: handle.get_slice(n) for n in handle.keys()}  # noqa: SIM118
        shapes = {n: tuple(s.get_shape()) for n, s in slices.items()}
        dtypes = {n: _ST_DTYPES.get(s.get_dtype()) or handle.get_tensor(n).dtype for n, s in slices.items()}
        metadata = handle.metadata()
    except Exception as exc:
        raise StepError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    return TensorFile(path, "safetensors", list(shapes), shapes, dtypes, handle.get_tensor, metadata=metadata)


def _open_file(path: Path) -> TensorFile:
    return open_safetensors(path) if path.suffix == ".safetensors" else open_torch(path)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepError(f"{index}: not a sharded checkpoint index (a json with a 'weight_map')") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise StepError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _open_sharded(index: Path) -> tuple[list[TensorFile], dict[str, TensorFile]]:
    """Shards in index order; each tensor is read from the shard the index names (as transformers does)."""
    weight_map = _read_index(index)
    files = {}
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise StepError(f"{index}: shard {shard!r} is not a file next to the index")
        files[shard] = _open_file(path)
    missing = [n for n, s in weight_map.items() if n not in files[s].shapes]
    if missing:
        raise StepError(f"{index}: tensors missing from the shards the index names: {missing[:5]}")
    where = {n: f for f in files.values() for n in f.names if weight_map.get(n) == f.path.name}
    return list(files.values()), where


def _beside_config(path: Path) -> Path | None:
    """The directory of an HF weights/index file when it holds a config.json (the model describes the order)."""
    if _HF_WEIGHTS_RE.match(path.name) and (path.parent / "config.json").is_file():
        return path.parent
    return None


def _hf_weights(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise StepError(f"{path}: a directory must be a Hugging Face model directory with config.json")
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise StepError(f"{path}: no {' or '.join(_HF_WEIGHTS)} in the Hugging Face model directory")


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Open one checkpoint (file, HF directory or sharded index) without reading its tensors."""
    path = Path(path)
    if not path.exists():
        raise StepError(f"{path}: no such file or directory")
    weights = _hf_weights(path) if path.is_dir() else path
    if weights.name.endswith(".index.json"):
        files, where = _open_sharded(weights)
        kind = "hf" if path.is_dir() else "index"
        return Snapshot(path, kind, files, where, index=weights, config_dir=_beside_config(weights))
    f = _open_file(weights)
    kind = "hf" if path.is_dir() else f.fmt
    return Snapshot(path, kind, [f], dict.fromkeys(f.names, f), config_dir=_beside_config(weights))


def order_snapshots(paths: list[Path]) -> list[Path]:
    """Oldest first: sorted by step number when every path has one (a shell glob sorts ``checkpoint-1000``
    before ``checkpoint-200``); the given order otherwise. Equal step numbers are an error."""
    steps = [parse_step(p) for p in paths]
    if any(s is None for s in steps):
        return paths
    seen: dict[int, Path] = {}
    for s, p in zip(steps, paths, strict=True):
        if s in seen:
            raise StepError(f"the snapshots {seen[s]} and {p} have the same step number {s}")
        seen[s] = p
    ordered = [seen[s] for s in sorted(seen)]
    if ordered != paths:
        logger.info("snapshots reordered by step number (oldest first): %s", ", ".join(map(str, ordered)))
    steps = sorted(seen)
    if len({b - a for a, b in zip(steps, steps[1:], strict=False)}) > 1:
        logger.warning("snapshots are unevenly spaced (steps %s); NiNo assumes equal spacing", steps)
    return ordered


def _check_series(snaps: list[Snapshot]) -> None:
    kinds = {s.kind for s in snaps}
    if len(kinds) > 1:
        raise StepError(f"the snapshots mix formats: {sorted(kinds)}")
    ref = snaps[0]
    for s in snaps[1:]:
        missing = sorted(set(ref.where) - set(s.where))
        extra = sorted(set(s.where) - set(ref.where))
        if missing or extra:
            raise StepError(f"{s.path}: tensor names differ from {ref.path}: missing {missing[:5]}, extra {extra[:5]}")
        for name in ref.where:
            if s.shape(name) != ref.shape(name):
                raise StepError(
                    f"{s.path}: tensor {name!r} has shape {s.shape(name)}, {ref.path} has {ref.shape(name)}"
                )


# ------------------------------------------------------------------------------- parameters and their order


@dataclass
class ModelSpec:
    """What the graph is built from: predicted ``(name, shape)`` in model order, ``{alias: name}`` of the stored
    tensors tied to a predicted one, the graph arguments, where the order came from (for messages), and
    ``{name: stored alias}`` for tied parameters stored under an alias only."""

    named: list[tuple[str, tuple[int, ...]]]
    aliases: dict[str, str]
    graph_args: dict
    order_from: str
    read_as: dict[str, str] = field(default_factory=dict)


def hf_model_spec(path: Path, keys) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str], dict]:
    """Named parameter shapes, ``{alias: parameter name}`` of tied tensors and graph args of an HF model.

    ``path``: a config.json or its directory. The model class is ``config.architectures[0]``, else the first of
    AutoModelForCausalLM / AutoModel whose parameter names are all among ``keys`` (the checkpoint's tensor
    names). Built on the meta device: shapes only, no memory, no initialisation cost."""
    try:
        import transformers
    except ImportError as exc:
        raise StepError(f"{path}: reading Hugging Face configs needs transformers (pip install transformers)") from exc
    from .graph import detect_arch

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise StepError(f"{path}: not a readable Hugging Face config.json ({type(exc).__name__}: {exc})") from exc
    model = _build_meta_model(transformers, config, set(keys), path)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    arch, heads, kv = detect_arch(model)
    return named, _model_aliases(model), dict(arch=arch, num_heads=heads, num_key_value_heads=kv)


def _model_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{state dict name: parameter name}`` of the state dict entries that are a tied parameter's other names."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {k: by_id[id(t)] for k, t in model.state_dict(keep_vars=True).items() if by_id.get(id(t), k) != k}


def _build_meta_model(transformers, config, keys: set[str], path: Path):
    archs = getattr(config, "architectures", None) or []
    named_cls = getattr(transformers, archs[0], None) if archs else None
    builders = [named_cls] if named_cls is not None else []
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    first_missing = None
    for build in builders:
        try:
            with torch.device("meta"):
                model = build(config)
        except (ValueError, TypeError):  # e.g. no causal-LM head for this config
            continue
        members = _tie_members(_model_aliases(model))
        missing = [n for n, _ in model.named_parameters() if not keys.intersection(members(n))]
        if not missing:
            return model
        first_missing = first_missing or missing
    raise StepError(
        f"{path}: the model built from config.json has parameters missing from the weights: {(first_missing or [])[:5]}"
    )


def _predictable(snap: Snapshot, names, pattern: re.Pattern | None) -> list[str]:
    """The tensors of a plain state dict that NiNo predicts (see the module docstring), in ``names`` order."""
    out = []
    for n in names:
        dtype, shape = snap.where[n].dtypes[n], snap.shape(n)
        if (
            dtype.is_floating_point
            and 1 <= len(shape) <= 4
            and math.prod(shape) > 0
            and not _BUFFER_RE.search(n)
            and not (pattern and pattern.search(n))
        ):
            out.append(n)
    return out


def _read_order(path: Path) -> tuple[list[str], dict[str, str]]:
    """``--order-from``: names (and storage ties) of a torch state dict, or the lines of a text file."""
    if not path.is_file():
        raise StepError(f"--order-from {path}: no such file")
    if path.suffix == ".safetensors":
        raise StepError(f"--order-from {path}: safetensors files keep no order; give a torch state dict or a text file")
    if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        f = open_torch(path)
        return f.names, f.ties
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise StepError(f"--order-from {path}: neither a torch state dict nor a text file of names") from exc
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")], {}


def _metadata_order(snap: Snapshot) -> list[str] | None:
    """A ``nino_fast_order`` JSON list of names in the safetensors metadata, when a writer recorded one."""
    for f in snap.files:
        raw = (f.metadata or {}).get(ORDER_METADATA_KEY)
        if raw is None:
            continue
        try:
            names = json.loads(raw)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StepError(f"{f.path}: metadata {ORDER_METADATA_KEY!r} must be a JSON list of parameter names")
        return names
    return None


def _uncertain_order(names: list[str], arch: str | None) -> str | None:
    """Why sorting by :func:`module_order_key` may not give the model's order (None: it surely does, i.e. a
    pure numeric-index ``nn.Sequential`` of weight/bias leaves under a generic graph)."""
    if arch not in (None, "generic"):
        return f"--arch {arch} asks for a transformer graph, whose order matters"
    for n in names:
        *module, leaf = n.split(".")
        if not module or not all(p.isdigit() for p in module) or leaf not in ("weight", "bias"):
            return f"{n!r} is not a numeric nn.Sequential name such as '0.weight'"
    return None


def _check_order(snap: Snapshot, order: list[str], members, source: str, pattern: re.Pattern | None):
    """The listed order must name every predicted tensor of the snapshot and nothing else (a tied name may be
    absent when another name of its group is stored: safetensors keeps one)."""
    dup = sorted(n for n, c in Counter(order).items() if c > 1)
    if dup:
        raise StepError(f"{source}: names listed twice: {dup[:5]}")
    absent = [n for n in order if not any(m in snap.where for m in members(n))]
    if absent:
        raise StepError(f"{source}: names not in the snapshot {snap.path}: {absent[:5]}")
    listed = {members(n)[0] for n in order}
    unlisted = [n for n in _predictable(snap, snap.names, pattern) if members(n)[0] not in listed]
    if unlisted:
        raise StepError(f"{source}: tensors of {snap.path} missing from the order: {unlisted[:5]} (or --exclude them)")


def plain_spec(snap: Snapshot, order_from: Path | None, exclude: str | None, graph_args: dict) -> ModelSpec:
    """Spec of a checkpoint without a config: order from ``--order-from``, the metadata, torch file order, or
    names when that is certain (see the module docstring); ties from torch storage."""
    pattern = _compile_exclude(exclude)
    ties = snap.ties
    if order_from is not None:
        order, order_ties = _read_order(order_from)
        ties = {**ties, **order_ties}
        source = f"--order-from {order_from}"
    elif (order := _metadata_order(snap)) is not None:
        source = f"{snap.path}: metadata {ORDER_METADATA_KEY!r}"
    elif snap.ordered:
        order, source = snap.names, "file order"
    else:
        reason = _uncertain_order(_predictable(snap, snap.names, pattern), graph_args.get("arch"))
        if reason:
            raise StepError(
                f"{snap.path}: the parameter order cannot be recovered (safetensors files and shard indexes "
                f"keep names sorted, and {reason}); {_HOW_TO_ORDER}"
            )
        order, source = sorted(snap.names, key=module_order_key), "names (numeric nn.Sequential)"
    if source != "file order":
        _check_order(snap, order, _tie_members(ties), source, pattern)
    named, aliases, read_as = _place(snap, order, ties, pattern)
    if not named:
        raise StepError(f"{snap.path}: no floating-point tensors to predict")
    return ModelSpec(named, aliases, graph_args, source, read_as)


def _tie_members(ties: dict[str, str]) -> Callable[[str], list[str]]:
    """name -> its tie group ``[parameter, *aliases]`` (``[name]`` when untied)."""
    groups: dict[str, list[str]] = {}
    for alias, name in ties.items():
        groups.setdefault(name, [name]).append(alias)
    return lambda n: groups.get(ties.get(n, n), [ties.get(n, n)])


def _place(snap: Snapshot, order, ties: dict[str, str], pattern: re.Pattern | None, select: bool = True):
    """Graph entries in model order, one per tie group under its parameter's name (as the model's
    ``named_parameters``), read from whichever member of the group the file stores (safetensors' ``save_model``
    may keep an alias only); ``select``: only the tensors NiNo predicts. -> (named, aliases, read_as)."""
    members = _tie_members(ties)
    named, aliases, read_as = [], {}, {}
    for n in dict.fromkeys(members(m)[0] for m in order):
        stored = [m for m in members(n) if m in snap.where]
        if not stored or (select and not _predictable(snap, stored[:1], pattern)):
            continue
        named.append((n, snap.shape(stored[0])))
        aliases.update({m: n for m in stored if m != n})
        if stored[0] != n:
            read_as[n] = stored[0]
    return named, aliases, read_as


def config_spec(snap: Snapshot, config: Path) -> ModelSpec:
    model_named, ties, graph_args = hf_model_spec(config, snap.where)
    named, aliases, read_as = _place(snap, [n for n, _ in model_named], ties, None, select=False)
    bad = [(n, s, e) for (n, s), (_, e) in zip(named, model_named, strict=True) if s != e]
    if bad:
        n, s, e = bad[0]
        raise StepError(f"{snap.path}: weights do not match {config}, e.g. {n!r} has shape {s}, the model expects {e}")
    return ModelSpec(named, aliases, graph_args, f"config {config}", read_as)


def model_spec(snap, config=None, order_from=None, exclude=None, arch=None, num_heads=None, num_kv_heads=None):
    """The graph's parameters, ties and arguments for ``snap`` (explicit arch/head options win)."""
    config_path = Path(config) if config is not None else snap.config_dir
    explicit = dict(arch=arch, num_heads=num_heads, num_key_value_heads=num_kv_heads)
    if config_path is not None:
        if order_from is not None:
            raise StepError(
                f"--order-from and a config.json ({config_path}) both give the parameter order; give one of them"
            )
        if exclude:
            logger.warning("--exclude is ignored: with %s the model's parameters are predicted", config_path)
        spec = config_spec(snap, config_path)
    else:
        spec = plain_spec(snap, Path(order_from) if order_from is not None else None, exclude, dict(explicit))
    spec.graph_args.update({a: v for a, v in explicit.items() if v is not None})
    return spec


def _compile_exclude(exclude: str | None) -> re.Pattern | None:
    try:
        return re.compile(exclude) if exclude else None
    except re.error as exc:
        raise StepError(f"--exclude {exclude!r}: not a valid regular expression ({exc})") from exc


# ------------------------------------------------------------------------------------------------- checks


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


def _input_files(snaps: list[Snapshot], extra=()) -> list[Path]:
    """Every path read by the step: snapshots, their weights files and indexes, the NiNo checkpoint, --config
    and --order-from (``extra``, those that exist)."""
    paths = [Path(p) for p in extra if p is not None and Path(p).exists()]
    for s in snaps:
        paths += [s.path, *(f.path for f in s.files)] + ([s.index] if s.index else [])
    return paths


def _looks_like_model_dir(path: Path) -> bool:
    """An existing output directory is replaced only when it is empty or holds a model (never e.g. $HOME)."""
    names = [p.name for p in path.iterdir()]
    return not names or any(n == "config.json" or _HF_WEIGHTS_RE.match(n) or n.endswith(".index.json") for n in names)


def check_out(out: Path, snaps: list[Snapshot], extra_inputs=()) -> None:
    """Refuse, before any work, an ``out`` that cannot be written or whose replacement would destroy an input."""
    inputs = _input_files(snaps, extra_inputs)
    wants_dir = snaps[-1].kind in ("hf", "index")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise StepError(f"--out {out}: the directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StepError(f"--out {out}: no write permission in the directory {parent}")
    if wants_dir and out.name.endswith(".json"):
        raise StepError(f"--out {out}: sharded checkpoints are written to a directory; give a directory path")
    if out.exists() or out.is_symlink():
        for p in inputs:
            if out.exists() and os.path.samefile(out, p):
                raise StepError(f"--out {out} is the same file as the input {p}: it is one of the input snapshots")
        if wants_dir and not out.is_dir():
            raise StepError(f"--out {out}: exists and is not a directory (the input is a {snaps[-1].kind} checkpoint)")
        if not wants_dir and out.is_dir():
            raise StepError(f"--out {out}: is a directory; the input {snaps[-1].path} is a single file")
        if wants_dir and not _looks_like_model_dir(out):
            raise StepError(f"--out {out}: refusing to replace a non-empty directory that holds no model")
    resolved = out.resolve()
    for p in inputs:
        if resolved in p.resolve().parents:
            raise StepError(f"--out {out}: holds the input {p}; replacing it would delete the input")


# ------------------------------------------------------------------------------------------------ writing


def _temp_path(out: Path, tag: str) -> Path:
    return out.absolute().parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def replace_file(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``out``, then rename it over ``out`` (atomic on POSIX)."""
    tmp = _temp_path(out, "tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary directory beside ``out``, then swap it in: an existing ``out`` is renamed
    aside first (a directory cannot be renamed over a non-empty one) and restored if the swap fails."""
    tmp = _temp_path(out, "tmp")
    os.mkdir(tmp)
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            old = _temp_path(out, "old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_tensors(f: TensorFile, predicted: dict[str, torch.Tensor], own: bool) -> dict[str, torch.Tensor]:
    """The output tensors of one file, in its stored order: predictions cast to the stored dtype (here, file by
    file, so a sharded model never has all its casts in memory at once), else the last snapshot's tensors.

    ``own``: copy predictions out of the shared float32 prediction buffer (a torch file saves whole storages, so
    a shard holding views of it would hold every shard's values). Aliases stay one tensor."""
    made: dict[tuple, torch.Tensor] = {}
    out = {}
    for n in f.names:
        t = predicted.get(n)
        if t is None:
            out[n] = f.read(n)
            continue
        key = (id(t), f.dtypes[n])
        if key not in made:
            cast = t.to(f.dtypes[n])
            shares = cast.untyped_storage().nbytes() > cast.numel() * cast.element_size()
            made[key] = cast.clone() if own and shares else cast
        out[n] = made[key]
    return out


def _save_torch_file(f: TensorFile, tensors: dict[str, torch.Tensor], target: Path) -> None:
    obj = tensors
    if f.wrapper is not None:
        obj = dict(f.wrapper)
        obj[f.wrapper_key] = tensors
    torch.save(obj, target)


def _save_safetensors_file(f: TensorFile, tensors: dict[str, torch.Tensor], target: Path) -> None:
    import safetensors.torch

    # safetensors refuses aliases: a tied tensor gets its own copy (transformers re-ties it on loading)
    seen, flat = set(), {}
    for name, t in tensors.items():
        flat[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    safetensors.torch.save_file(flat, str(target), metadata=f.metadata)


def _save(f: TensorFile, predicted: dict[str, torch.Tensor], target: Path, own: bool) -> None:
    tensors = _file_tensors(f, predicted, own and f.fmt == "torch")
    (_save_safetensors_file if f.fmt == "safetensors" else _save_torch_file)(f, tensors, target)


def _write_dir(last: Snapshot, predicted: dict[str, torch.Tensor], target: Path) -> None:
    if last.kind == "hf":
        for item in last.path.iterdir():  # config, generation config, tokenizer files ...
            if item.is_file() and not _HF_WEIGHTS_RE.match(item.name) and not _TRAINING_STATE.match(item.name):
                shutil.copy2(item, target / item.name)
    if last.index is not None:  # same shard names and tensor -> shard map: the index is valid as it is
        shutil.copy2(last.index, target / last.index.name)
    for f in last.files:
        _save(f, predicted, target / f.path.name, own=len(last.files) > 1)


def write_prediction(last: Snapshot, predicted: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``predicted`` (name -> tensor, aliases included) in ``last``'s format and layout, atomically."""
    try:
        if last.kind in ("hf", "index"):
            replace_dir(out, lambda tmp: _write_dir(last, predicted, tmp))
        else:
            replace_file(out, lambda tmp: _save(last.files[0], predicted, tmp, own=False))
    except OSError as exc:
        raise StepError(f"--out {out}: cannot write it ({type(exc).__name__}: {exc}); it is left as it was") from exc


# ---------------------------------------------------------------------------------------------- the step


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


def read_history(snaps: list[Snapshot], spec: ModelSpec) -> torch.Tensor:
    """(P, ctx) float32 history, oldest first, parameters in graph order; filled one tensor at a time, so only
    the history (not the snapshots) is in memory."""
    sizes = [math.prod(s) for _, s in spec.named]
    states = torch.empty(sum(sizes), len(snaps))
    for j, snap in enumerate(snaps):
        off = 0
        for (name, _), n in zip(spec.named, sizes, strict=True):
            states[off : off + n, j] = snap.get(spec.read_as.get(name, name)).reshape(-1)
            off += n
    return states


def split_prediction(pred: torch.Tensor, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` float32 views of the flat prediction (no copy); every alias is the very tensor of the
    parameter it is tied to (written as one tensor, which torch saves as one storage)."""
    out, off = {}, 0
    for name, shape in spec.named:
        n = math.prod(shape)
        out[name] = pred[off : off + n].view(shape)
        off += n
    for alias, name in spec.aliases.items():
        out[alias] = out[name]
    return out


def _predict(predictor, spec: ModelSpec, snaps: list[Snapshot], k: int, device) -> torch.Tensor:
    graph = None
    if getattr(predictor, "needs_graph", True):
        from .graph import build_graph

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
    _compile_exclude(exclude)
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
    _check_series(snaps)
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
