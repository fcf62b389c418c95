"""The two orders NiNo depends on. Snapshots: oldest first, by step number when every name has one. Parameters:
the neural graph is built from the parameters in the model's order, with each tie group once; the order and the
ties come from a Hugging Face config, ``--order-from``, the safetensors metadata, torch file order, or the names
when they make it certain (see :mod:`nino_fast.offline`). Never a silently different graph: anything else is a
:class:`StepError` saying how to give the order."""

from __future__ import annotations

import json
import logging
import math
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import StepError
from .files import HF_WEIGHTS_RE, Snapshot, open_torch

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"(?:step|checkpoint|ckpt|iter|iteration|epoch)[-_=]?(\d+)", re.IGNORECASE)
_ATTENTION_RE = re.compile(r"(^|\.)(self_attn|attn|attention)\.")
_BUFFER_RE = re.compile(r"(running_mean|running_var|num_batches_tracked)$")
ORDER_METADATA_KEY = "nino_fast_order"
_HOW_TO_ORDER = (
    "pass --config CONFIG (a Hugging Face config.json, or its directory: the model is built from it) or "
    "--order-from FILE (a torch state dict of the same model, or a text file with one parameter name per "
    "line, in the model's order), or save the snapshots as torch files"
)


# ------------------------------------------------------------------------------------ order of the snapshots


def parse_step(path: Path) -> int | None:
    """Training step from a name such as ``step_1000.pt``, ``checkpoint-1000`` or ``ckpt1000.safetensors``;
    for HF weights/index files (``checkpoint-1000/model.safetensors``) the step is their directory's."""
    path = Path(path)
    hits = _STEP_RE.findall(path.name)
    if not hits and HF_WEIGHTS_RE.match(path.name):
        hits = _STEP_RE.findall(path.resolve().parent.name)
    return int(hits[-1]) if hits else None


def order_snapshots(paths: list[Path]) -> list[Path]:
    """Oldest first: sorted by step number when every path has one (a shell glob sorts ``checkpoint-1000``
    before ``checkpoint-200``); the given order otherwise. Equal step numbers are an error."""
    steps = [parse_step(p) for p in paths]
    if any(s is None for s in steps):
        numbers = [re.findall(r"\d+", Path(p).name) for p in paths]
        if all(numbers) and [int(n[-1]) for n in numbers] != sorted(int(n[-1]) for n in numbers):
            logger.warning(
                "the snapshots' names carry numbers but not step numbers (step, checkpoint, ckpt, iter, iteration "
                "or epoch followed by a number): they are taken oldest first in the order given, %s",
                ", ".join(Path(p).name for p in paths),
            )
        return paths
    seen: dict[int, Path] = {}
    for s, p in zip(steps, paths, strict=True):
        if s in seen:
            raise StepError(f"the snapshots {seen[s]} and {p} have the same step number {s}")
        seen[s] = p
    steps = sorted(seen)
    ordered = [seen[s] for s in steps]
    if ordered != paths:
        logger.info("snapshots reordered by step number (oldest first): %s", ", ".join(map(str, ordered)))
    if len({b - a for a, b in zip(steps, steps[1:], strict=False)}) > 1:
        logger.warning("snapshots are unevenly spaced (steps %s); NiNo assumes equal spacing", steps)
    return ordered


# ----------------------------------------------------------------------------------- order of the parameters


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
        if arch is None and any(_ATTENTION_RE.search(n) for n, _ in spec.named):
            logger.warning(
                "%s: the tensor names look like a transformer's, but without a config.json the graph is the generic "
                "one (no attention-head edges); pass --arch and --num-heads (and --num-kv-heads) for its own graph",
                snap.path,
            )
    spec.graph_args.update({a: v for a, v in explicit.items() if v is not None})
    return spec


# ----------------------------------------------------------------------------------- from an HF config.json


def config_spec(snap: Snapshot, config: Path) -> ModelSpec:
    """Spec of the model built from ``config``: all its parameters, in its order, with its ties; the weights
    must have the model's shapes."""
    model_named, ties, graph_args = hf_model_spec(config, snap.where)
    named, aliases, read_as = _place(snap, [n for n, _ in model_named], ties, None, select=False)
    bad = [(n, s, e) for (n, s), (_, e) in zip(named, model_named, strict=True) if s != e]
    if bad:
        n, s, e = bad[0]
        raise StepError(f"{snap.path}: weights do not match {config}, e.g. {n!r} has shape {s}, the model expects {e}")
    return ModelSpec(named, aliases, graph_args, f"config {config}", read_as)


def hf_model_spec(path: Path, keys) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str], dict]:
    """Named parameter shapes, ``{alias: parameter name}`` of tied tensors and graph args of an HF model.

    ``path``: a config.json or its directory. The model class is ``config.architectures[0]``, else the first of
    AutoModelForCausalLM / AutoModel whose parameter names are all among ``keys`` (the checkpoint's tensor
    names). Built on the meta device: shapes only, no memory, no initialisation cost."""
    try:
        import transformers
    except ImportError as exc:
        raise StepError(f"{path}: reading Hugging Face configs needs transformers (pip install transformers)") from exc
    from ..graph import detect_arch

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise StepError(f"{path}: not a readable Hugging Face config.json ({type(exc).__name__}: {exc})") from exc
    model, legacy = _build_meta_model(transformers, config, set(keys), path)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    arch, heads, kv = detect_arch(model)
    return named, {**_model_aliases(model), **legacy}, dict(arch=arch, num_heads=heads, num_key_value_heads=kv)


def _build_meta_model(transformers, config, keys: set[str], path: Path):
    """``(model, legacy)``: the first candidate model class whose parameters are all stored (under some name of
    their tie group, or a legacy name transformers renames when loading: ``legacy`` = {stored key: parameter});
    a base model's checkpoint has no LM head, so AutoModelForCausalLM would not match it."""
    archs = getattr(config, "architectures", None) or []
    named_cls = getattr(transformers, archs[0], None) if archs else None
    builders = [named_cls] if named_cls is not None else []
    builders += [transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    first_missing, converted = None, False
    for build in builders:
        try:
            with torch.device("meta"):
                model = build(config)
        except (ValueError, TypeError):  # e.g. no causal-LM head for this config
            continue
        legacy, converts = _legacy_names(model, keys)
        members = _tie_members({**_model_aliases(model), **legacy})
        missing = [n for n, _ in model.named_parameters() if not keys.intersection(members(n))]
        if not missing:
            return model, legacy
        first_missing, converted = first_missing or missing, converted or converts
    hint = (
        " (transformers converts this model's stored tensors when loading them, e.g. merges per-expert weights; "
        "nino-fast step predicts tensors as stored: save the snapshots as torch state dicts, "
        "torch.save(model.state_dict(), ...))"
        if converted
        else ""
    )
    raise StepError(
        f"{path}: the model built from config.json has parameters missing from the weights: "
        f"{(first_missing or [])[:5]}{hint}"
    )


def _legacy_names(model, keys: set[str]) -> tuple[dict[str, str], bool]:
    """``({stored key: parameter name}, converts)``: the stored keys that transformers' checkpoint conversion renames
    to one of ``model``'s parameters when loading (save_pretrained may write a model's legacy names, e.g.
    GPT-NeoX's ``embed_out``), and whether the model has conversions that change tensors (not only names)."""
    try:  # transformers >= 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}, False
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converts = any(isinstance(t, WeightConverter) for t in transforms)
    params = dict(model.named_parameters())
    legacy = {}
    for key in keys - params.keys():
        try:
            renamed, _ = rename_source_key(key, renamings, [], model.base_model_prefix, dict(model.state_dict()))
        except (TypeError, ValueError, re.error):
            continue
        if renamed in params:
            legacy[key] = renamed
    return legacy, converts


def _model_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{state dict name: parameter name}`` of the state dict entries that are a tied parameter's other names."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {k: by_id[id(t)] for k, t in model.state_dict(keep_vars=True).items() if by_id.get(id(t), k) != k}


# --------------------------------------------------------------------------------------- without a config


def plain_spec(snap: Snapshot, order_from: Path | None, exclude: str | None, graph_args: dict) -> ModelSpec:
    """Spec of a checkpoint without a config: order from ``--order-from``, the metadata, torch file order, or
    names when that is certain (see :mod:`nino_fast.offline`); ties from torch storage."""
    pattern = compile_exclude(exclude)
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


def module_order_key(name: str) -> tuple:
    """Sort key approximating registration order from a name alone: module path with numbers compared as
    numbers, then ``weight`` before other leaves before ``bias`` (``0.weight, 0.bias, 2.weight,
    10.weight``)."""
    *module, leaf = name.split(".")
    path = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module)
    return path, {"weight": 0, "bias": 2}.get(leaf, 1), leaf


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


def _predictable(snap: Snapshot, names, pattern: re.Pattern | None) -> list[str]:
    """The tensors of a plain state dict that NiNo predicts (see :mod:`nino_fast.offline`), in ``names`` order."""
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


def compile_exclude(exclude: str | None) -> re.Pattern | None:
    """``--exclude`` compiled, or a :class:`StepError` naming the option (``re.error`` would name none)."""
    try:
        return re.compile(exclude) if exclude else None
    except re.error as exc:
        raise StepError(f"--exclude {exclude!r}: not a valid regular expression ({exc})") from exc


# ------------------------------------------------------------------------------------------------ ties


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
