"""On-disk trajectory store: one memory-mapped (n_states, n_params) array per run plus a JSON manifest.

Layout of a store directory::

    manifest.json          {"format": "nino_fast.meta.trajectories/1", "dtype": "float16", "runs": {id: entry}}
    runs/<id>.f16          raw little-endian float16 (or bfloat16 bits, ``.bf16``), C order, row = one snapshot

An entry holds the task spec, ``param_shapes`` (the ``named_parameters`` layout of a row), ``n_states``,
``save_every`` (optimizer steps between rows), the validation loss at each row, the run's seconds, and
``diverged``. A run is written to ``<file>.part`` and renamed when complete; the manifest is rewritten
atomically after every run, so an interrupted collection loses at most the run in progress (resumption unit:
one run). Rows are read back with :meth:`TrajectoryStore.states` as float32.

Why float16: parameters of the small models live in [-10, 10]; float16's 11-bit significand keeps a relative
error of 2^-11, well below the snapshot-to-snapshot changes NiNo learns from (the official meta-training
data is float16 too). bfloat16 (8-bit significand, float32's range) is offered for models with larger values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

FORMAT = "nino_fast.meta.trajectories/1"
DTYPES = {"float16": (np.float16, ".f16"), "bfloat16": (np.int16, ".bf16")}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class TrajectoryStore:
    """A store directory (created if missing). ``dtype``: 'float16' or 'bfloat16' for new stores; an existing
    store keeps its own."""

    def __init__(self, root, dtype: str = "float16"):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        if self.manifest_path.is_file():
            self.manifest = json.loads(self.manifest_path.read_text())
            if self.manifest.get("format") != FORMAT:
                raise ValueError(
                    f"TrajectoryStore({root}): not a {FORMAT} store (format {self.manifest.get('format')})"
                )
        else:
            if dtype not in DTYPES:
                raise ValueError(f"TrajectoryStore: dtype must be one of {list(DTYPES)}, got {dtype!r}")
            self.manifest = {"format": FORMAT, "dtype": dtype, "runs": {}}
        self.dtype = self.manifest["dtype"]
        self._np_dtype, self._suffix = DTYPES[self.dtype]
        self._maps: dict[str, np.memmap] = {}

    # ---- writing ----------------------------------------------------------------------------------------------
    def bytes_for(self, n_states: int, n_params: int) -> int:
        return n_states * n_params * 2

    def has(self, run_id: str) -> bool:
        return run_id in self.manifest["runs"]

    def writer(self, run_id: str, n_states: int, n_params: int) -> RunWriter:
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        return RunWriter(self, run_id, n_states, n_params)

    def _commit(self, run_id: str, entry: dict) -> None:
        self.manifest["runs"][run_id] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.manifest_path, json.dumps(self.manifest, indent=1))

    # ---- reading ----------------------------------------------------------------------------------------------
    @property
    def runs(self) -> dict[str, dict]:
        return self.manifest["runs"]

    def array(self, run_id: str) -> np.memmap:
        """(n_states, n_params) memory map of a run (raw dtype: float16, or int16 bits of bfloat16)."""
        if run_id not in self._maps:
            e = self.runs[run_id]
            n_params = sum(math.prod(s) for _, s in e["param_shapes"])
            self._maps[run_id] = np.memmap(
                self.root / e["file"], dtype=self._np_dtype, mode="r", shape=(e["n_states"], n_params)
            )
        return self._maps[run_id]

    def states(self, run_id: str, rows) -> torch.Tensor:
        """float32 (len(rows), n_params) copy of the given snapshot rows."""
        raw = torch.from_numpy(np.ascontiguousarray(self.array(run_id)[np.asarray(rows)]))
        return (raw.view(torch.bfloat16) if self.dtype == "bfloat16" else raw).float()

    def disk_bytes(self) -> int:
        return sum(
            self.bytes_for(e["n_states"], sum(math.prod(s) for _, s in e["param_shapes"])) for e in self.runs.values()
        )


class RunWriter:
    """Writes one run's rows into ``<file>.part``; :meth:`commit` renames it and records the manifest entry."""

    def __init__(self, store: TrajectoryStore, run_id: str, n_states: int, n_params: int):
        self.store, self.run_id, self.n_states, self.n_params = store, run_id, n_states, n_params
        self.file = Path("runs") / f"{run_id}{store._suffix}"
        self.part = store.root / (str(self.file) + ".part")
        self.map = np.memmap(self.part, dtype=store._np_dtype, mode="w+", shape=(n_states, n_params))
        self.rows = 0

    def write(self, index: int, flat: torch.Tensor) -> None:
        flat = flat.detach().to("cpu")
        if self.store.dtype == "bfloat16":
            self.map[index] = flat.to(torch.bfloat16).view(torch.int16).numpy()
        else:
            self.map[index] = flat.to(torch.float16).numpy()
        self.rows = max(self.rows, index + 1)

    def commit(self, entry: dict) -> None:
        self.map.flush()
        del self.map
        final = self.store.root / self.file
        os.replace(self.part, final)
        self.store._commit(self.run_id, {**entry, "file": str(self.file), "n_states": self.rows})

    def abort(self) -> None:
        del self.map
        self.part.unlink(missing_ok=True)
