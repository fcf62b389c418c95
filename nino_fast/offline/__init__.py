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

Memory. Files are opened lazily (safetensors headers, then plain file reads per tensor; ``torch.load(mmap=True)``)
and read one tensor at a time; the snapshots themselves are never held in memory (except torch files of the
legacy, non-zip format, which cannot be memory-mapped). ``history="memory"`` fills the ``(P, ctx)`` float32
history and builds the whole graph; ``history="disk"`` (automatic when that would not fit) keeps only the
prediction, in the snapshots' dtype: the graph stays a block layout and each tile's edges and history rows are
assembled and read when a pass reaches them (:func:`nino_fast.stream.nowcast_layout`, the same bytes). The
output is written file by file (shard by shard).

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

Modules: :mod:`.files` (checkpoints opened lazily), :mod:`.order` (order of the snapshots, order and ties of the
parameters), :mod:`.write` (output checks, atomic writes in the input's format), :mod:`.step` (the step).
"""

from .errors import StepError
from .files import Snapshot, TensorFile, load_snapshot, open_safetensors, open_torch, storage_ties
from .order import (
    ORDER_METADATA_KEY,
    ModelSpec,
    config_spec,
    hf_model_spec,
    model_spec,
    module_order_key,
    order_snapshots,
    parse_step,
    plain_spec,
)
from .step import check_device, nowcast_checkpoints, read_history, resolve_k, split_prediction
from .write import check_out, replace_dir, replace_file, write_prediction

__all__ = [
    "ORDER_METADATA_KEY",
    "ModelSpec",
    "Snapshot",
    "StepError",
    "TensorFile",
    "check_device",
    "check_out",
    "config_spec",
    "hf_model_spec",
    "load_snapshot",
    "model_spec",
    "module_order_key",
    "nowcast_checkpoints",
    "open_safetensors",
    "open_torch",
    "order_snapshots",
    "parse_step",
    "plain_spec",
    "read_history",
    "replace_dir",
    "replace_file",
    "resolve_k",
    "split_prediction",
    "storage_ties",
    "write_prediction",
]
