"""Checkpoints opened lazily: torch files (memory-mapped), safetensors files (headers), Hugging Face model
directories and sharded indexes. Names, shapes and dtypes come without reading any data, and tensors are read
one at a time, so ctx snapshots of a large model never sit in memory together."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import StepError

logger = logging.getLogger(__name__)

_HF_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# every weights file of an HF directory (also stale ones next to the file in use): never copied
HF_WEIGHTS_RE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
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
    def out_is_dir(self) -> bool:
        """Whether its prediction is written as a directory (HF model directories, and sharded indexes whose
        shards go beside the index)."""
        return self.kind in ("hf", "index")

    @property
    def ties(self) -> dict[str, str]:
        return {a: n for f in self.files for a, n in f.ties.items()}


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Open one checkpoint (file, HF directory or sharded index) without reading its tensors."""
    path = Path(path)
    if not path.exists():
        raise StepError(f"{path}: no such file or directory")
    weights = _hf_weights(path) if path.is_dir() else path
    if weights.name.endswith(".index.json"):
        (files, where), index = _open_sharded(weights), weights
    else:
        f = _open_file(weights)
        files, where, index = [f], dict.fromkeys(f.names, f), None
    kind = "hf" if path.is_dir() else ("index" if index is not None else files[0].fmt)
    return Snapshot(path, kind, files, where, index=index, config_dir=_beside_config(weights))


def check_series(snaps: list[Snapshot]) -> None:
    """The snapshots must be one model at different steps: same format, same tensor names, same shapes (NiNo
    predicts each parameter from its own history)."""
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


# ------------------------------------------------------------------------------------------- single files


def open_torch(path: Path) -> TensorFile:
    """A torch state dict (or a dict holding one), memory-mapped; its storage ties are kept (see
    :func:`storage_ties`)."""
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
    """The header only (names, shapes, dtypes); tensors are read on demand with plain file reads
    (:class:`_SafetensorsReads`): the page cache holds what was read, not the process, so reading every tensor of
    ctx large snapshots leaves the process's resident memory at what it keeps (a memory map would count each page
    read). Files with dtypes this reader does not know are read through ``safetensors.safe_open``."""
    try:
        reads = _SafetensorsReads(path)
    except _Unsupported:
        return _open_safetensors_mapped(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    names = sorted(reads.entries)
    shapes = {n: reads.entries[n][1] for n in names}
    dtypes = {n: reads.entries[n][0] for n in names}
    return TensorFile(path, "safetensors", names, shapes, dtypes, reads.read, metadata=reads.metadata)


class _Unsupported(Exception):
    """A safetensors dtype :class:`_SafetensorsReads` does not map: read the file through safetensors instead."""


class _SafetensorsReads:
    """A safetensors file's header (8-byte little-endian length, JSON: name -> dtype, shape, data offsets) and
    tensors read from their byte ranges with ``os.pread``."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            size = os.fstat(f.fileno()).st_size
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise _Unsupported(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - self.start:
                raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not match {shape} {info['dtype']}")
            self.entries[name] = (dtype, shape, begin, end)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], self.start + begin + done)
                if got <= 0:
                    raise OSError(f"{self.path}: unexpected end of file reading {name!r}")
                done += got
        finally:
            os.close(fd)
        return buf.view(dtype).reshape(shape)


def _open_safetensors_mapped(path: Path) -> TensorFile:
    """The header through ``safetensors.safe_open``; tensors read on demand through its memory-mapped handle."""
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


def _open_file(path: Path) -> TensorFile:
    """Safetensors by suffix; anything else is a torch file (torch has no one suffix: ``.pt``, ``.bin``, ...)."""
    return open_safetensors(path) if path.suffix == ".safetensors" else open_torch(path)


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
    """The state dict of a torch file and, when it is nested (``{'state_dict': ..., 'epoch': ...}``), the outer
    dict and its key, so the output keeps the other entries."""
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


# ----------------------------------------------------------------------- HF directories and sharded indexes


def _hf_weights(path: Path) -> Path:
    """The weights (or index) file of an HF model directory, in transformers' order of preference."""
    if not (path / "config.json").is_file():
        raise StepError(f"{path}: a directory must be a Hugging Face model directory with config.json")
    for name in _HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise StepError(f"{path}: no {' or '.join(_HF_WEIGHTS)} in the Hugging Face model directory")


def _beside_config(path: Path) -> Path | None:
    """The directory of an HF weights/index file when it holds a config.json (the model describes the order)."""
    if HF_WEIGHTS_RE.match(path.name) and (path.parent / "config.json").is_file():
        return path.parent
    return None


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


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index json."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StepError(f"{index}: not a sharded checkpoint index (a json with a 'weight_map')") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise StepError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map
