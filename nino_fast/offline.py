"""One NiNo step on saved model checkpoints (``nino-fast step``): read ctx snapshots, write the predicted one.

Formats (the output has the input's format):

- torch files (``.pt``, ``.pth``, ``.bin``, ...): a state dict ``{name: tensor}``, or a dict holding it under
  ``'state_dict'`` or ``'model'`` (other entries are copied from the last snapshot);
- ``.safetensors`` files (metadata copied from the last snapshot);
- Hugging Face model directories: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``. The model
  is built from its config with ``transformers`` on the meta device (no download, no memory) to get the
  parameter order, the architecture and the attention heads; the other files of the directory are copied,
  except a Trainer checkpoint's training state (optimizer, scheduler, RNG, trainer state).

Order. The neural graph needs the parameters in the model's order. Torch files keep it (dict order).
Safetensors files do not (names come back sorted), so plain ``.safetensors`` files are ordered by
:func:`module_order_key` (module path with numeric indices, ``weight`` before ``bias``), right for
``nn.Sequential``-style fc/conv models but not for modules registered out of alphabetical order (e.g.
attention q/k/v): save those as torch files or as Hugging Face directories, whose order comes from the model
built from ``config.json``.

Which tensors are predicted. For Hugging Face directories, the model's parameters (tied tensors once; their
aliases in the file receive the same prediction). For plain state dicts, every floating-point tensor of rank
1-4 except normalisation statistics (``running_mean``, ``running_var``) and names matching ``exclude``; the
graph is built from the file's ``(name, shape)`` list in file order with ``arch`` / ``num_heads``. Everything
else is copied from the last snapshot. Predictions are written in each tensor's stored dtype.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .optim import k_schedule, load_predictor

logger = logging.getLogger(__name__)

_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_STEP_RE = re.compile(r"(?:step|checkpoint|ckpt|iter|iteration|epoch)[-_=]?(\d+)", re.IGNORECASE)
# Trainer checkpoint files that describe the old parameters' optimisation, not the model: not copied
_TRAINING_STATE = re.compile(
    r"(optimizer\.pt|scheduler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|nino_state\.pt)$"
)
_BUFFER_RE = re.compile(r"(running_mean|running_var|num_batches_tracked)$")


class StepError(ValueError):
    """A problem with the inputs of the offline step (reported by the CLI without a traceback)."""


@dataclass
class Snapshot:
    """One loaded checkpoint: its tensors plus what is needed to write a checkpoint of the same format."""

    path: Path
    kind: str  # 'torch', 'safetensors' or 'hf'
    tensors: dict[str, torch.Tensor]
    weights_file: Path  # the file holding the tensors (the path itself unless kind == 'hf')
    wrapper: dict | None = None  # torch files: the outer dict when the state dict is nested
    wrapper_key: str | None = None
    metadata: dict | None = field(default=None)  # safetensors metadata


def parse_step(path: Path) -> int | None:
    """Training step from a name such as ``step_1000.pt``, ``checkpoint-1000`` or ``ckpt1000.safetensors``."""
    hits = _STEP_RE.findall(path.name)
    return int(hits[-1]) if hits else None


def _load_torch(path: Path) -> tuple[dict, dict | None, str | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StepError(f"{path}: not a loadable torch checkpoint ({type(exc).__name__}: {exc})") from exc
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


def module_order_key(name: str) -> tuple:
    """Sort key approximating registration order from a name alone: module path with numbers compared as
    numbers, then ``weight`` before other leaves before ``bias`` (``0.weight, 0.bias, 2.weight,
    10.weight``)."""
    *module, leaf = name.split(".")
    path = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module)
    return path, {"weight": 0, "bias": 2}.get(leaf, 1), leaf


def _load_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            # safetensors keeps no tensor order (keys come back sorted by name); the neural graph needs the
            # model's order, approximated here (HF directories get the exact order from their config)
            names = sorted(f.keys(), key=module_order_key)
            return {k: f.get_tensor(k) for k in names}, f.metadata()
    except Exception as exc:
        raise StepError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    path = Path(path)
    if not path.exists():
        raise StepError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StepError(f"{path}: a directory must be a Hugging Face model directory with config.json")
        if (path / "model.safetensors.index.json").exists() or (path / "pytorch_model.bin.index.json").exists():
            raise StepError(f"{path}: sharded Hugging Face checkpoints are not supported")
        for name in _HF_WEIGHTS:
            weights = path / name
            if weights.is_file():
                inner = load_snapshot(weights)
                return Snapshot(path, "hf", inner.tensors, weights, inner.wrapper, inner.wrapper_key, inner.metadata)
        raise StepError(f"{path}: no {' or '.join(_HF_WEIGHTS)} in the Hugging Face model directory")
    if path.suffix == ".safetensors":
        tensors, meta = _load_safetensors(path)
        return Snapshot(path, "safetensors", tensors, path, metadata=meta)
    tensors, wrapper, key = _load_torch(path)
    return Snapshot(path, "torch", tensors, path, wrapper, key)


def hf_model_spec(path: Path, keys) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str], dict]:
    """Named parameter shapes, ``{alias: parameter name}`` of tied tensors and graph args of an HF dir.

    The model class is ``config.architectures[0]``, else the first of AutoModelForCausalLM / AutoModel whose
    parameter names are all among ``keys`` (the weights file's tensor names)."""
    try:
        import transformers
    except ImportError as exc:
        raise StepError(
            f"{path}: reading Hugging Face directories needs transformers (pip install transformers)"
        ) from exc
    from .graph import detect_arch

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    named_cls = getattr(transformers, archs[0], None) if archs else None
    builders = [named_cls] if named_cls is not None else []
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    keys, first_missing = set(keys), None
    for build in builders:
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                model = build(config)
        except (ValueError, TypeError):  # e.g. no causal-LM head for this config
            continue
        missing = [n for n, _ in model.named_parameters() if n not in keys]
        if not missing:
            break
        first_missing = first_missing or missing
    else:
        raise StepError(
            f"{path}: the model built from config.json has parameters missing from the weights file: "
            f"{(first_missing or [])[:5]}"
        )
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    by_id = {id(p): n for n, p in model.named_parameters()}
    aliases = {
        k: by_id[id(t)] for k, t in model.state_dict(keep_vars=True).items() if id(t) in by_id and by_id[id(t)] != k
    }
    arch, heads, kv = detect_arch(model)
    return named, aliases, dict(arch=arch, num_heads=heads, num_key_value_heads=kv)


def _check_series(snaps: list[Snapshot]) -> None:
    kinds = {s.kind for s in snaps}
    if len(kinds) > 1:
        raise StepError(f"the snapshots mix formats: {sorted(kinds)}")
    ref = snaps[0]
    for s in snaps[1:]:
        missing = sorted(set(ref.tensors) - set(s.tensors))
        extra = sorted(set(s.tensors) - set(ref.tensors))
        if missing or extra:
            raise StepError(f"{s.path}: tensor names differ from {ref.path}: missing {missing[:5]}, extra {extra[:5]}")
        for name, t in ref.tensors.items():
            if s.tensors[name].shape != t.shape:
                raise StepError(
                    f"{s.path}: tensor {name!r} has shape {tuple(s.tensors[name].shape)}, "
                    f"{ref.path} has {tuple(t.shape)}"
                )
    steps = [parse_step(s.path) for s in snaps]
    if all(v is not None for v in steps):
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise StepError(
                f"the snapshots are not in training order (oldest first): steps {steps} parsed from "
                f"{[s.path.name for s in snaps]}"
            )
        gaps = {b - a for a, b in zip(steps, steps[1:], strict=False)}
        if len(gaps) > 1:
            logger.warning("snapshots are unevenly spaced (steps %s); NiNo assumes equal spacing", steps)


def select_params(snap: Snapshot, exclude: str | None) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a plain state dict that NiNo predicts (see the module docstring), in file order."""
    pattern = re.compile(exclude) if exclude else None
    return [
        (n, tuple(t.shape))
        for n, t in snap.tensors.items()
        if t.is_floating_point()
        and 1 <= t.dim() <= 4
        and t.numel() > 0
        and not _BUFFER_RE.search(n)
        and not (pattern and pattern.search(n))
    ]


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
) -> dict:
    """Apply one NiNo step to ``paths`` (oldest first), write the prediction to ``out``; return a summary."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    predictor = load_predictor(nino, ctx=len(paths))
    if predictor is None:
        raise StepError("--nino is required (a NiNo checkpoint path, 'linefit' or 'linefit+')")
    if len(paths) != predictor.ctx:
        raise StepError(f"{type(predictor).__name__} takes ctx={predictor.ctx} snapshots, got {len(paths)}")
    if any(out.resolve() == p.resolve() for p in paths if p.exists()):
        raise StepError(f"--out {out} is one of the input snapshots")
    snaps = [load_snapshot(p) for p in paths]
    _check_series(snaps)
    last = snaps[-1]
    k = resolve_k(k, period, max_train_steps, step, int(predictor.seq_len), k_decay, last.path)
    aliases: dict[str, str] = {}
    if last.kind == "hf":
        named, aliases, graph_args = hf_model_spec(last.path, last.tensors)
        bad = [n for n, s in named if tuple(last.tensors[n].shape) != s]
        if bad:
            raise StepError(
                f"{last.path}: weights do not match config.json, e.g. {bad[0]!r} has shape "
                f"{tuple(last.tensors[bad[0]].shape)}, the model expects {dict(named)[bad[0]]}"
            )
    else:
        named = select_params(last, exclude)
        graph_args = dict(arch=arch, num_heads=num_heads, num_key_value_heads=num_key_value_heads)
        if not named:
            raise StepError(f"{last.path}: no floating-point tensors to predict")
    if arch is not None or num_heads is not None or num_key_value_heads is not None:  # explicit options win
        graph_args.update(
            {
                a: v
                for a, v in (
                    ("arch", arch),
                    ("num_heads", num_heads),
                    ("num_key_value_heads", num_key_value_heads),
                )
                if v is not None
            }
        )

    graph = None
    if getattr(predictor, "needs_graph", True):
        from .graph import build_graph

        graph = build_graph(named, lpe=int(predictor.lpe), **graph_args)
        if isinstance(predictor, torch.nn.Module):
            predictor.to(device)
    # (P, ctx) float32 history, oldest first, parameters in graph order
    states = torch.stack([torch.cat([s.tensors[n].reshape(-1).float() for n, _ in named]) for s in snaps], 1)
    try:
        pred = predictor.nowcast(graph, states, k)
    except ValueError as exc:
        raise StepError(f"the NiNo prediction failed: {exc}") from exc

    result = dict(last.tensors)
    off = 0
    for name, shape in named:
        n = torch.Size(shape).numel()
        result[name] = pred[off : off + n].view(shape).to(last.tensors[name].dtype)
        off += n
    for alias, name in aliases.items():
        if alias in result:
            result[alias] = result[name]
    _write(last, result, out)
    return dict(
        k=k,
        num_params=int(states.shape[0]),
        num_tensors=len(named),
        out=str(out),
        predictor=type(predictor).__name__,
        format=last.kind,
    )


def _write(last: Snapshot, tensors: dict[str, torch.Tensor], out: Path) -> None:
    if last.kind == "hf":
        out.mkdir(parents=True, exist_ok=True)
        for item in last.path.iterdir():  # config, generation config, tokenizer files ...
            if item.is_file() and item.name != last.weights_file.name and not _TRAINING_STATE.match(item.name):
                shutil.copy2(item, out / item.name)
        target = out / last.weights_file.name
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        target = out
    if last.weights_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared storage: tied aliases get their own copy
        seen, flat = set(), {}
        for name, t in tensors.items():
            flat[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
            seen.add(t.data_ptr())
        save_file(flat, str(target), metadata=last.metadata)
        return
    obj = tensors
    if last.wrapper is not None:
        obj = dict(last.wrapper)
        obj[last.wrapper_key] = tensors
    torch.save(obj, target)
