"""The meta-training tasks: small models on data that ships with packages, their specs, and the training plans.

A task is a JSON-able dict (a *spec*)::

    {"family": "convnet" | "mlp" | "gpt2" | "llama", "width": 8, "depth": 3, "act": "relu", "opt": "adamw",
     "lr": 3e-3, "wd": 0.01, "seed": 101, "steps": 2400, "batch": 64, "save_every": 20}

- ``convnet``: the demo's ConvNet family on sklearn digits (8x8): ``depth`` 3x3 convolutions (``1 -> w``,
  ``w -> 2w`` with stride 2, then ``2w -> 2w``), activations, global average pooling, a linear classifier.
- ``mlp``: flattened digits, ``depth`` hidden layers of ``width`` units (``widths`` for uneven ones).
- ``gpt2`` / ``llama``: a character-level causal language model (Hugging Face ``GPT2LMHeadModel`` /
  ``LlamaForCausalLM``, hidden ``width``, ``depth`` blocks, ``heads`` attention heads; Llama: ``kv_heads``
  key/value heads, default ``heads``, an MLP of ``ffn`` units, default ``2 * width``, untied embeddings) on
  :func:`char_corpus`, a deterministic text of a few Python standard-library modules, ``seq`` characters of
  context (default 64) and a vocabulary of the :data:`VOCAB` characters (no ``act`` key: GELU / SiLU as the
  architectures have them). Their neural graphs are built with ``arch`` = the family (:func:`graph_args`).

Plans: :func:`default_plan` (ConvNets and MLPs, lr 1e-3..5e-3: the recipe of the bundled checkpoint, unchanged)
and :func:`wide_plan` (more MLP depths and widths, lr 1e-4..5e-3, and the transformers), :func:`slow_plan` (deep
and wide MLPs at lr 1e-4..1e-3); ``PLANS`` names them.

Held out (never in the training plan, checked by :func:`check_plan`):

- the **demo task**, :mod:`nino_fast.demo`'s ConvNet (width 16, depth 3): no ConvNet of width 16 at all, at any
  depth, seed or learning rate;
- the **held-out task**, an MLP 64-128-128-128-10 (three hidden layers of 128: deeper and wider than every
  MLP in the default plan), AdamW lr 3e-4 (below the default plan's 1e-3..5e-3; at 3e-3 this MLP overfits
  digits within 200 steps, so "steps to AdamW's final loss" would measure nothing). The wide plan has MLPs as
  deep (three hidden layers) or as wide (128, 256) and learning rates down to 1e-4, but never its widths.

Both are evaluated with the demo's protocol by ``bench/bench_meta_eval.py``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
FAMILIES = ("convnet", "mlp", "gpt2", "llama")
TRANSFORMERS = ("gpt2", "llama")

_OPTS = (("adamw", 0.01), ("adam", 0.0), ("adamw", 0.1))  # (optimizer, weight decay) the plans cycle through
DEMO_TASK = dict(family="convnet", width=16, depth=3, act="relu", opt="adamw", lr=3e-3, wd=0.01)
HELDOUT_TASK = dict(family="mlp", widths=[128, 128, 128], act="relu", opt="adamw", lr=3e-4, wd=0.01)

# The character-level corpora: texts of the running Python's standard library. A source text is the modules
# listed, concatenated in this order; "docs" is the English documentation that ships with it (pydoc_data's help
# topics, in key order). Characters outside VOCAB map to "?"; the last tenth of a text is its validation text.
CORPUS_FILES = ("textwrap.py", "heapq.py", "string.py", "functools.py", "bisect.py", "fnmatch.py")  # ~100 kB
TEXTS: dict[str, tuple[str, ...]] = {
    "src-a": CORPUS_FILES,
    "src-b": ("collections/__init__.py", "dataclasses.py", "enum.py"),  # ~190 kB
    "src-c": ("typing.py", "ast.py"),  # ~180 kB
    "src-h": ("argparse.py", "difflib.py", "tarfile.py", "inspect.py"),  # ~410 kB, held out
    "docs": ("pydoc_data/topics.py",),  # the help topics' text (not the module's source), first DOCS_CHARS, held out
}
DEFAULT_TEXT = "src-a"
HELDOUT_TEXTS = ("src-h", "docs")
DOCS_CHARS = 300_000
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII: 96 characters

# Held-out language-model tasks (no transformer of width 96 and no held-out text in any training plan): a GPT-2
# on the documentation's English and a grouped-query Llama on unseen sources; AdamW lr 1e-3, 16 windows of 64
# characters, constant learning rate (the evaluation protocol of bench/bench_meta_eval.py).
HELDOUT_LM_TASKS = {
    "lm-gpt2": dict(family="gpt2", width=96, depth=3, heads=4, text="docs"),
    "lm-llama": dict(family="llama", width=96, depth=2, heads=4, kv_heads=2, text="src-h"),
}
HELDOUT_LM_WIDTH = 96


def is_transformer(spec: dict) -> bool:
    """Whether ``spec`` is a character-level transformer task (``gpt2`` or ``llama``)."""
    return spec.get("family") in TRANSFORMERS


def _check_family(spec: dict, where: str) -> None:
    if spec.get("family") not in FAMILIES:
        raise ValueError(f"{where}: unknown family {spec.get('family')!r} (expected one of {list(FAMILIES)})")


def task_id(spec: dict) -> str:
    """A readable unique name, e.g. ``convnet-w8-d3-relu-adamw-lr0.003-wd0.01-s101`` or
    ``llama-w32-d1-h2-adamw-lr0.001-wd0.01-s7``."""
    _check_family(spec, "task_id")
    if is_transformer(spec):
        shape = f"w{spec['width']}-d{spec['depth']}-h{spec['heads']}"
        shape += f"-kv{spec['kv_heads']}" if spec.get("kv_heads") else ""
        shape += f"-f{spec['ffn']}" if spec.get("ffn") else ""
        shape += f"-t{spec['seq']}" if spec.get("seq", 64) != 64 else ""
        shape += "" if "tie" not in spec else "-tied" if spec["tie"] else "-untied"
        run = f"{spec['opt']}-lr{spec['lr']:g}-wd{spec['wd']:g}"
        run += "-cos" if spec.get("sched", "constant") == "cosine" else ""
        run += f"-{spec['text']}" if spec.get("text", DEFAULT_TEXT) != DEFAULT_TEXT else ""
        return f"{spec['family']}-{shape}-{run}-s{spec['seed']}"
    shape = "x".join(map(str, spec["widths"])) if "widths" in spec else f"w{spec['width']}-d{spec['depth']}"
    return f"{spec['family']}-{shape}-{spec['act']}-{spec['opt']}-lr{spec['lr']:g}-wd{spec['wd']:g}-s{spec['seed']}"


def is_held_out(spec: dict) -> bool:
    """Whether ``spec`` is too close to a held-out task: a ConvNet of the demo's width (any depth), the held-out
    MLP's widths, or a transformer of the held-out width (:data:`HELDOUT_LM_WIDTH`) or on a held-out text, at any
    seed, learning rate or optimizer."""
    if is_transformer(spec):
        return spec["width"] == HELDOUT_LM_WIDTH or spec.get("text", DEFAULT_TEXT) in HELDOUT_TEXTS
    if spec["family"] == "convnet":
        return spec.get("width") == DEMO_TASK["width"]
    return spec["family"] == "mlp" and list(_mlp_widths(spec)) == HELDOUT_TASK["widths"]


def _mlp_widths(spec: dict) -> list[int]:
    return list(spec["widths"]) if "widths" in spec else [spec["width"]] * spec["depth"]


def _transformer(spec: dict) -> nn.Module:
    import transformers as tf

    w, depth, heads = spec["width"], spec["depth"], spec["heads"]
    if w % heads:
        raise ValueError(f"build_model: width {w} is not a multiple of heads {heads}")
    common = dict(vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0, use_cache=False)
    common["tie_word_embeddings"] = spec.get("tie", spec["family"] == "gpt2")  # the families' defaults
    if spec["family"] == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=w,
            n_layer=depth,
            n_head=heads,
            n_positions=spec.get("seq", 64),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        return tf.GPT2LMHeadModel(cfg)
    kv = spec.get("kv_heads") or heads
    if heads % kv:
        raise ValueError(f"build_model: heads {heads} is not a multiple of kv_heads {kv}")
    cfg = tf.LlamaConfig(
        hidden_size=w,
        intermediate_size=spec.get("ffn") or 2 * w,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=spec.get("seq", 64),
        **common,
    )
    return tf.LlamaForCausalLM(cfg)


def build_model(spec: dict) -> nn.Module:
    """The (freshly initialised, with the global RNG) model of ``spec``."""
    _check_family(spec, "build_model")
    if is_transformer(spec):
        return _transformer(spec)
    act = _ACTS[spec.get("act", "relu")]
    if spec["family"] == "convnet":
        w, depth = spec["width"], spec["depth"]
        if depth < 2:
            raise ValueError(f"build_model: a convnet needs depth >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(1, w, 3, padding=1), act(), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)]
        layers.append(act())
        for _ in range(depth - 2):
            layers += [nn.Conv2d(2 * w, 2 * w, 3, padding=1), act()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10)]
        return nn.Sequential(*layers)
    layers, d = [nn.Flatten()], 64
    for w in _mlp_widths(spec):
        layers += [nn.Linear(d, w), act()]
        d = w
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def named_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The model's trainable ``(name, shape)`` list, in ``named_parameters`` order (the snapshot layout)."""
    with torch.device("meta"):
        model = build_model(spec)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def graph_args(spec: dict) -> dict:
    """Keyword arguments of :func:`nino_fast.build_graph` for the model of ``spec`` (besides its shapes): the
    architecture and attention heads of a transformer (what :func:`nino_fast.graph.detect_arch` finds on the
    module, so that :class:`nino_fast.NiNo` builds the same graph); ``{}`` (generic) otherwise."""
    _check_family(spec, "graph_args")
    if not is_transformer(spec):
        return {}
    kv = spec.get("kv_heads") or spec["heads"]
    return dict(
        arch=spec["family"], num_heads=spec["heads"], num_key_value_heads=None if spec["family"] == "gpt2" else kv
    )


def load_digits_split(split_seed: int = 0):
    """(x_train, y_train, x_val, y_val): images (N, 1, 8, 8) in [0, 1], a stratified 80/20 split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("the demo needs scikit-learn and matplotlib: pip install 'nino_fast[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    tr, va = train_test_split(np.arange(len(y)), test_size=0.2, stratify=data.target, random_state=split_seed)
    return x[tr], y[tr], x[va], y[va]


def digits():
    """The demo's stratified 80/20 split of sklearn digits: (x_train, y_train, x_val, y_val)."""
    return load_digits_split()


def _docs_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip the documentation
        raise FileNotFoundError("char_corpus: the 'docs' text needs the standard library's pydoc_data") from e
    return "\n".join(topics[k] for k in sorted(topics))[:DOCS_CHARS]


@functools.lru_cache(maxsize=4)
def _corpus(files: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    text = ""
    for name in files:
        if name == "pydoc_data/topics.py":
            text += _docs_text()
            continue
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"char_corpus: {path} not found (the standard library's source is needed)")
        text += path.read_text(encoding="utf-8")
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    ids = torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)
    info = dict(files=list(files), chars=len(text), sha256=hashlib.sha256(text.encode()).hexdigest()[:16])
    return ids, info


def char_corpus(files: tuple[str, ...] | str = CORPUS_FILES) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train ids, validation ids, info): the concatenated source of ``files`` (standard library of the running
    Python; or the name of one of :data:`TEXTS`) as :data:`VOCAB` indices, split 90/10 (the validation text is
    the last tenth); ``info`` records the files, the length and a sha256 prefix of the text."""
    if isinstance(files, str):
        if files not in TEXTS:
            raise ValueError(f"char_corpus: unknown text {files!r} (expected one of {list(TEXTS)})")
        files = TEXTS[files]
    ids, info = _corpus(tuple(files))
    cut = len(ids) * 9 // 10
    return ids[:cut], ids[cut:], info


def load_data(spec: dict):
    """The data of ``spec``'s family: :func:`digits` or :func:`char_corpus` (cached)."""
    _check_family(spec, "load_data")
    return char_corpus(spec.get("text", DEFAULT_TEXT)) if is_transformer(spec) else _digits_cached()


@functools.lru_cache(maxsize=1)
def _digits_cached():
    return digits()


def make_schedule(spec: dict, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``spec['sched']``: ``"constant"`` (default, None) or ``"cosine"``: linear warm-up over the first 5% of
    ``spec['steps']``, then cosine decay to a tenth of the learning rate."""
    kind = spec.get("sched", "constant")
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"make_schedule: unknown schedule {kind!r} (expected 'constant' or 'cosine')")
    steps = spec["steps"]
    warm = max(1, steps // 20)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_optimizer(spec: dict, params) -> torch.optim.Optimizer:
    if spec["opt"] == "adamw":
        return torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["wd"])
    if spec["opt"] == "adam":
        return torch.optim.Adam(params, lr=spec["lr"], weight_decay=spec["wd"])
    raise ValueError(f"make_optimizer: unknown optimizer {spec['opt']!r} (expected 'adamw' or 'adam')")


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy of a causal LM on ``ids`` (B, seq + 1)."""
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def task_loop(spec: dict, data=None):
    """``(train_loss(model, generator), val_loss(model))`` of ``spec``'s family: a random mini-batch of
    ``spec['batch']`` examples (digits) or windows of ``seq + 1`` characters (transformers), drawn with the
    generator; the validation loss on the whole digits validation split or on 32 evenly spaced windows of the
    validation text."""
    data = load_data(spec) if data is None else data
    batch = spec["batch"]
    if is_transformer(spec):
        train_ids, val_ids, _ = data
        seq = spec.get("seq", 64)
        if len(val_ids) < seq + 1 or len(train_ids) < seq + 2:
            raise ValueError(f"task_loop: the corpus is too short for windows of {seq + 1} characters")
        span = torch.arange(seq + 1)
        starts = torch.linspace(0, len(val_ids) - seq - 1, 32).long()
        val_windows = val_ids[starts.unsqueeze(1) + span]

        def train_loss(model, gen):
            s = torch.randint(len(train_ids) - seq - 1, (batch,), generator=gen)
            return _lm_loss(model, train_ids[s.unsqueeze(1) + span])

        return train_loss, lambda model: _lm_loss(model, val_windows)
    x_tr, y_tr, x_va, y_va = data

    def train_loss(model, gen):
        idx = torch.randint(len(y_tr), (batch,), generator=gen)
        return F.cross_entropy(model(x_tr[idx]), y_tr[idx])

    return train_loss, lambda model: F.cross_entropy(model(x_va), y_va)


def run_task(spec: dict, on_snapshot: Callable[[int, torch.Tensor, float], None], data=None) -> dict:
    """Train ``spec``'s model, calling ``on_snapshot(index, flat_params, val_loss)`` at step 0 and every
    ``save_every`` steps (the parameters as they are *before* the step of that index, as NiNo records them).
    ``data``: the family's data (:func:`load_data`; loaded if None).

    Returns ``{"seconds", "final_val_loss", "diverged"}`` (and ``"data"``, the corpus info, for transformers); a
    run whose loss or parameters go non-finite stops there (``diverged=True``).
    """
    data = load_data(spec) if data is None else data
    train_loss, val_loss = task_loop(spec, data)
    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    opt = make_optimizer(spec, model.parameters())
    sched = make_schedule(spec, opt)
    batches = torch.Generator().manual_seed(spec["seed"])
    t0 = time.perf_counter()
    every, steps = spec["save_every"], spec["steps"]
    extra = {"data": data[2]} if is_transformer(spec) else {}
    val = float("nan")
    for i in range(steps + 1):
        if i % every == 0:
            with torch.no_grad():
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                val = val_loss(model).item()
            if not (torch.isfinite(flat).all() and flat.abs().max() < 6e4):  # float16 range
                return {"seconds": time.perf_counter() - t0, "final_val_loss": val, "diverged": True, **extra}
            on_snapshot(i // every, flat, val)
        if i == steps:
            break
        opt.zero_grad()
        train_loss(model, batches).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {"seconds": time.perf_counter() - t0, "final_val_loss": val, "diverged": False, **extra}


def default_plan(steps: int = 2400, save_every: int = 20) -> list[dict]:
    """The training plan: ConvNets and MLPs of varied width/depth/activation, AdamW/Adam at varied lr and
    seeds, interleaved (so that a time-bounded collection gets a mix of families)."""
    convs = [(8, 3), (12, 3), (8, 2), (24, 3), (12, 4), (20, 2), (6, 3), (32, 2), (10, 4), (24, 2)]
    mlps = [[32], [64], [32, 32], [64, 64], [96, 48], [48, 48], [128], [64, 32]]
    lrs = [3e-3, 1e-3, 5e-3, 2e-3]
    acts = ["relu", "relu", "gelu", "tanh"]
    plan, seed = [], 100
    for r in range(12):
        for j, (w, d) in enumerate(convs):
            seed += 1
            o, wd = _OPTS[(r + j) % len(_OPTS)]
            spec = dict(
                family="convnet",
                width=w,
                depth=d,
                act=acts[(r + j) % len(acts)],
                opt=o,
                lr=lrs[(r + 2 * j) % len(lrs)],
                wd=wd,
                seed=seed,
            )
            plan.append(spec)
            if j < len(mlps):
                seed += 1
                o, wd = _OPTS[(r + j + 1) % len(_OPTS)]
                spec = dict(
                    family="mlp",
                    widths=mlps[(r + j) % len(mlps)],
                    act=acts[(r + 3 * j) % len(acts)],
                    opt=o,
                    lr=lrs[(r + j) % len(lrs)],
                    wd=wd,
                    seed=seed,
                )
                plan.append(spec)
    for spec in plan:
        spec.update(steps=steps, batch=64, save_every=save_every)
    check_plan(plan)
    return plan


def transformer_specs(steps: int = 1200, save_every: int = 20, seed: int = 500) -> list[dict]:
    """Character-level GPT-2 and Llama tasks of varied width (32-64), depth (1-2), heads (2-4, Llama with and
    without grouped-query attention), optimizer and learning rate (3e-4..3e-3), batch 16 windows of 64
    characters; about 10-40 s per run on one core at 1,200 steps."""
    shapes = [
        ("llama", 32, 1, 2, None),
        ("gpt2", 32, 1, 2, None),
        ("llama", 48, 2, 4, 2),
        ("gpt2", 48, 1, 4, None),
        ("llama", 64, 1, 4, None),
        ("gpt2", 32, 2, 4, None),
        ("llama", 32, 2, 2, 1),
        ("gpt2", 64, 1, 2, None),
    ]
    lrs = [1e-3, 3e-4, 3e-3, 6e-4, 2e-3]
    plan = []
    for r in range(3):
        for j, (family, w, d, h, kv) in enumerate(shapes):
            seed += 1
            o, wd = _OPTS[(r + j) % len(_OPTS)]
            spec = dict(family=family, width=w, depth=d, heads=h, opt=o, lr=lrs[(r * 3 + j) % len(lrs)], wd=wd)
            if kv:
                spec["kv_heads"] = kv
            spec.update(seed=seed, steps=steps, batch=16, save_every=save_every, seq=64)
            plan.append(spec)
    return plan


def lm_plan(steps: int = 2400, save_every: int = 20, rounds: int = 3) -> list[dict]:
    """Character-level language models for the transformer checkpoint: GPT-2 and Llama of widths 32-256 (never
    the held-out 96), 2-6 blocks, multi-head and grouped-query attention, tied and untied embeddings, 64-256
    characters of context, batches of 8-32 windows, AdamW / Adam at lr 3e-4..3e-3, constant or warm-up + cosine
    schedules, on the three training texts (``src-a/b/c``; never a held-out text). ``rounds`` rounds of the nine
    shapes below (seeds 900, 901, ...), each round cycling the learning rate, optimizer, schedule and text; about
    25-300 s per run on one core at 2,400 steps (the 256-wide GPT-2 is the slowest)."""
    # family, width, depth, heads, kv heads, tied embeddings, context, batch
    shapes = [
        ("gpt2", 32, 2, 2, None, True, 64, 16),
        ("llama", 64, 2, 4, 2, False, 64, 16),
        ("gpt2", 64, 4, 4, None, True, 128, 8),
        ("llama", 48, 3, 4, 1, True, 64, 32),
        ("gpt2", 128, 2, 4, None, False, 64, 16),
        ("llama", 128, 3, 8, 2, False, 64, 16),
        ("gpt2", 48, 6, 4, None, True, 64, 16),
        ("llama", 32, 4, 2, 1, True, 256, 8),
        ("gpt2", 256, 2, 8, None, True, 64, 16),
    ]
    lrs = [1e-3, 3e-4, 3e-3, 6e-4, 2e-3]
    texts = ["src-a", "src-b", "src-c"]
    plan, seed = [], 900
    for r in range(rounds):
        for j, (family, w, d, h, kv, tie, seq, batch) in enumerate(shapes):
            o, wd = _OPTS[(r + j) % len(_OPTS)]
            spec = dict(family=family, width=w, depth=d, heads=h, opt=o, wd=wd, lr=lrs[(2 * r + j) % len(lrs)])
            if kv:
                spec["kv_heads"] = kv
            spec.update(tie=tie, seq=seq, sched=("constant", "cosine")[(r + j) % 2], text=texts[(r + 2 * j) % 3])
            spec.update(seed=seed, steps=steps, batch=batch, save_every=save_every)
            plan.append(spec)
            seed += 1
    check_plan(plan)
    return plan


def _mlp_round(shapes, r, lrs, lr_shift, acts, seed) -> tuple[list[dict], int]:
    """Round ``r`` of a plan's MLPs: one spec per shape, seeds ``seed + 1, ...``; optimizer, activation and
    learning rate cycle with the round and the shape (lr index ``lr_shift * r + j``). Returns them and the last
    seed used."""
    specs = []
    for j, widths in enumerate(shapes):
        seed += 1
        o, wd = _OPTS[(r + j) % len(_OPTS)]
        act, lr = acts[(r + 2 * j) % len(acts)], lrs[(lr_shift * r + j) % len(lrs)]
        specs.append(dict(family="mlp", widths=widths, act=act, opt=o, wd=wd, seed=seed, lr=lr))
    return specs, seed


def wide_plan(steps: int = 2400, save_every: int = 20) -> list[dict]:
    """A wider plan: MLPs of 1-4 hidden layers and widths 32-256 (never the held-out 128-128-128), ConvNets,
    and :func:`transformer_specs` (at ``steps // 2``), with learning rates 1e-4..5e-3, interleaved as MLP,
    ConvNet, MLP, transformer (so a time-bounded collection gets a mix)."""
    mlps = [
        [64, 64],
        [256],
        [64, 64, 64],
        [128, 64],
        [32, 32, 32],
        [96, 96, 96],
        [128],
        [48, 48, 48, 48],
        [128, 64, 32],
        [256, 128],
        [32, 64, 32],
        [128, 128],
        [64, 32],
        [96, 48, 24],
        [64, 64, 64, 64],
        [32],
    ]
    convs = [(8, 3), (12, 3), (8, 2), (24, 3), (12, 4), (20, 2), (6, 3), (32, 2), (10, 4), (24, 2)]
    lrs = [1e-4, 1e-3, 2e-4, 3e-3, 5e-4, 2e-3, 7e-4, 5e-3]
    conv_lrs = [1e-3, 5e-4, 3e-3, 2e-3, 5e-3]
    acts = ["relu", "relu", "gelu", "tanh", "silu"]
    mlp_specs, conv_specs, seed = [], [], 300
    for r in range(4):
        specs, seed = _mlp_round(mlps, r, lrs, 3, acts, seed)
        mlp_specs += specs
        for j, (w, d) in enumerate(convs):
            seed += 1
            o, wd = _OPTS[(r + j + 1) % len(_OPTS)]
            conv_specs.append(
                dict(
                    family="convnet",
                    width=w,
                    depth=d,
                    act=acts[(r + j) % len(acts)],
                    opt=o,
                    wd=wd,
                    seed=seed,
                    lr=conv_lrs[(r + 2 * j) % len(conv_lrs)],
                )
            )
    for spec in mlp_specs + conv_specs:
        spec.update(steps=steps, batch=64, save_every=save_every)
    trf = transformer_specs(max(steps // 2, save_every), save_every)
    plan, queues = [], [mlp_specs, conv_specs, mlp_specs, trf]
    while any(queues):
        for q in queues:
            if q:
                plan.append(q.pop(0))
    check_plan(plan)
    return plan


def slow_plan(steps: int = 2400, save_every: int = 20) -> list[dict]:
    """Deep and wide MLPs at small learning rates (1e-4..1e-3), the regime where a NiNo jump must be aimed well:
    two to four hidden layers of 64-256 units (never the held-out 128-128-128; three-layer ones 96 and 160 wide
    bracket it), ReLU mostly, AdamW/Adam, 3 rounds of 16 shapes at learning rates cycling through six values."""
    mlps = [
        [160, 160, 160],
        [256, 128],
        [96, 96, 96, 96],
        [128, 128],
        [192, 96, 48],
        [64, 128, 64],
        [256, 256],
        [96, 96, 96],
        [128, 64, 128],
        [160, 80],
        [64, 64, 64, 64],
        [192, 192],
        [128, 128, 64],
        [256, 128, 64],
        [64, 64, 64],
        [128, 96, 64, 32],
    ]
    lrs = [3e-4, 1e-4, 5e-4, 2e-4, 1e-3, 7e-4]
    acts = ["relu", "relu", "gelu", "relu", "tanh"]
    plan, seed = [], 700
    for r in range(3):
        specs, seed = _mlp_round(mlps, r, lrs, 2, acts, seed)
        plan += specs
    for spec in plan:
        spec.update(steps=steps, batch=64, save_every=save_every)
    check_plan(plan)
    return plan


PLANS: dict[str, Callable[..., list[dict]]] = {
    "default": default_plan,
    "wide": wide_plan,
    "slow": slow_plan,
    "lm": lm_plan,
}


def make_plan(
    name: str = "default",
    steps: int = 2400,
    save_every: int = 20,
    families: Sequence[str] | None = None,
    rounds: int | None = None,
) -> list[dict]:
    """The plan called ``name`` (one of :data:`PLANS`); with ``families``, only its runs of those families (in
    the plan's order), checked again by :func:`check_plan`; ``rounds``: how many rounds of a plan made of rounds
    (the lm plan: 9 runs each, new seeds; the first rounds are the same runs whatever the count, so a store grows
    by rerunning with more)."""
    if name not in PLANS:
        raise ValueError(f"make_plan: unknown plan {name!r} (expected one of {list(PLANS)})")
    if save_every > steps:
        raise ValueError(
            f"make_plan: save_every ({save_every}) is more than steps ({steps}): a run would keep one state"
        )
    extra = {}
    if rounds is not None:
        if "rounds" not in inspect.signature(PLANS[name]).parameters:
            raise ValueError(f"make_plan: the {name} plan has no rounds")
        if rounds < 1:
            raise ValueError(f"make_plan: rounds must be >= 1, got {rounds}")
        extra["rounds"] = rounds
    plan = PLANS[name](steps=steps, save_every=save_every, **extra)
    if families is None:
        return plan
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"make_plan: unknown families {unknown} (expected some of {list(FAMILIES)})")
    plan = [s for s in plan if s["family"] in families]
    if not plan:
        raise ValueError(f"make_plan: the {name} plan has no runs of the families {list(families)}")
    check_plan(plan)
    return plan


def check_plan(plan: list[dict]) -> None:
    """Raise if a held-out task (the demo's or the held-out one) is in ``plan`` or two specs share an id."""
    bad = [task_id(s) for s in plan if is_held_out(s)]
    if bad:
        raise ValueError(f"the training plan contains held-out tasks: {bad[:3]}")
    ids = [task_id(s) for s in plan]
    if len(set(ids)) != len(ids):
        raise ValueError("the training plan has duplicate task ids")
