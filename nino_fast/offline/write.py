"""Writing the prediction: checked before any work (never over an input, never into a directory that holds no
model), written in the input's format and layout, and atomic (a temporary file or directory beside ``out``, then
renamed over it), so a failure leaves an existing ``out`` untouched."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import StepError
from .files import HF_WEIGHTS_RE, Snapshot, TensorFile

# Trainer checkpoint files that describe the old parameters' optimisation, not the model: not copied
_TRAINING_STATE = re.compile(
    r"(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|nino_state\.pt)$"
)


# ------------------------------------------------------------------------------------------- output checks


def check_out(out: Path, snaps: list[Snapshot], extra_inputs=()) -> None:
    """Refuse, before any work, an ``out`` that cannot be written or whose replacement would destroy an input."""
    inputs = _input_files(snaps, extra_inputs)
    wants_dir = snaps[-1].out_is_dir
    parent = out.absolute().parent
    if not parent.is_dir():
        raise StepError(f"--out {out}: the directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StepError(f"--out {out}: no write permission in the directory {parent}")
    if wants_dir and out.name.endswith(".json"):
        raise StepError(f"--out {out}: sharded checkpoints are written to a directory; give a directory path")
    if os.path.lexists(out):
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
    return not names or any(n == "config.json" or HF_WEIGHTS_RE.match(n) or n.endswith(".index.json") for n in names)


# ------------------------------------------------------------------------------------- atomic replacement


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
        if os.path.lexists(out):
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


def _temp_path(out: Path, tag: str) -> Path:
    """A hidden, unique name beside ``out``: same file system, so the final rename is atomic."""
    return out.absolute().parent / f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


# ------------------------------------------------------------------------------ the prediction, as the input


def write_prediction(last: Snapshot, predicted: dict[str, torch.Tensor], out: Path) -> None:
    """Write ``predicted`` (name -> tensor, aliases included) in ``last``'s format and layout, atomically."""
    try:
        if last.out_is_dir:
            replace_dir(out, lambda tmp: _write_dir(last, predicted, tmp))
        else:
            replace_file(out, lambda tmp: _save(last.files[0], predicted, tmp, own=False))
    except OSError as exc:
        raise StepError(f"--out {out}: cannot write it ({type(exc).__name__}: {exc}); it is left as it was") from exc


def _write_dir(last: Snapshot, predicted: dict[str, torch.Tensor], target: Path) -> None:
    """The last snapshot's directory with predicted weights: same shards, its index, and its other files except
    weights and training state (which describe the old parameters)."""
    if last.kind == "hf":
        for item in last.path.iterdir():  # config, generation config, tokenizer files ...
            if item.is_file() and not HF_WEIGHTS_RE.match(item.name) and not _TRAINING_STATE.match(item.name):
                shutil.copy2(item, target / item.name)
    if last.index is not None:  # same shard names and tensor -> shard map: the index is valid as it is
        shutil.copy2(last.index, target / last.index.name)
    for f in last.files:
        _save(f, predicted, target / f.path.name, own=len(last.files) > 1)


def _save(f: TensorFile, predicted: dict[str, torch.Tensor], target: Path, own: bool) -> None:
    """One weights file in ``f``'s format (``own``: see :func:`_file_tensors`; only torch files need it)."""
    tensors = _file_tensors(f, predicted, own and f.fmt == "torch")
    (_save_safetensors_file if f.fmt == "safetensors" else _save_torch_file)(f, tensors, target)


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
    """``torch.save``, nested back into the original outer dict when there was one (its other entries kept)."""
    obj = tensors
    if f.wrapper is not None:
        obj = dict(f.wrapper)
        obj[f.wrapper_key] = tensors
    torch.save(obj, target)


def _save_safetensors_file(f: TensorFile, tensors: dict[str, torch.Tensor], target: Path) -> None:
    """``safetensors.torch.save_file`` with the input's metadata (e.g. ``format``, the recorded order)."""
    import safetensors.torch

    # safetensors refuses aliases: a tied tensor gets its own copy (transformers re-ties it on loading)
    seen, flat = set(), {}
    for name, t in tensors.items():
        flat[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())
    safetensors.torch.save_file(flat, str(target), metadata=f.metadata)
