"""Where an interrupted streamed step resumes: a directory of what its passes have finished.

A NiNo step over a graph kept as its layout (:func:`nino_fast.stream.nowcast_layout`, ``nino-fast step`` from
checkpoints on disk) runs three passes over the graph's tiles: two message passes, each ending in an (N, D) node
aggregation, and the head pass, which writes each tile's predicted parameters. A :class:`StepState` keeps

- ``key.json``: what the step is (its inputs, horizon, device, code version); a directory holding another step's
  state is cleared, never reused;
- ``agg0.pt``, ``agg1.pt``: the two aggregations, saved (atomically) when their pass ends;
- ``result.bin``: the prediction, a file the head pass writes through a shared memory map, and ``head.json``: how
  many of its tiles are written (their NaN/Inf count, the tiling), updated after each tile.

Rerunning the same step loads the aggregations, skips the finished tiles and gives bitwise the prediction of an
uninterrupted run (every value is computed by the same operations; the saved aggregations are exact). The
written tiles survive the process (Ctrl-C, a kill): their pages belong to the file; a crash of the machine itself
can lose the last seconds of them, which is why ``head.json`` is written only after a tile's values are in the
map and re-read values are never trusted beyond it. The caller removes the directory once the prediction is
written (:meth:`clear`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepState:
    """The state directory ``root`` of one step described by ``key`` (a JSON-serialisable dict)."""

    def __init__(self, root: str | os.PathLike, key: dict, fresh: bool = False):
        """``fresh``: drop what a previous run of the same step saved."""
        self.root = Path(root)
        self.key = json.loads(json.dumps(key, sort_keys=True))  # as it reads back
        if self.root.exists() and (fresh or self._read_json("key.json") != self.key):
            if not fresh:
                log.info("%s: the state of another step (inputs, k or code changed); starting over", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tiling = None
        if self._read_json("key.json") is None:
            self._write_json("key.json", self.key)

    # ---- the message passes' aggregations -------------------------------------------------------------------
    def load(self, name: str) -> torch.Tensor | None:
        """The tensor saved under ``name``, or None."""
        path = self.root / f"{name}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:  # a damaged file: recomputed
            log.info("%s: unreadable (%s), recomputing it", path, exc)
            return None

    def save(self, name: str, tensor: torch.Tensor) -> None:
        self._atomic(f"{name}.pt", lambda f: torch.save(tensor.detach().cpu(), f))

    def saved(self) -> list[str]:
        """The names of the saved tensors."""
        return sorted(p.stem for p in self.root.glob("*.pt"))

    # ---- the head pass --------------------------------------------------------------------------------------
    def result(self, numel: int, dtype: torch.dtype, tiling: list[tuple[int, int]]) -> torch.Tensor:
        """The (numel,) prediction as a tensor backed by ``result.bin``: the tiles a previous run wrote are kept
        when it ran the same ``tiling`` (the head pass's (edge_lo, edge_hi) per tile: the default tiling follows
        the free memory, which may change between runs); otherwise the head pass starts over."""
        path = self.root / "result.bin"
        nbytes = numel * dtype.itemsize
        self._tiling = hashlib.sha256(json.dumps(tiling).encode()).hexdigest()
        head = self._read_json("head.json") or {}
        if not path.is_file() or path.stat().st_size != nbytes or head.get("tiling") != self._tiling:
            self.head_done(0, 0)
            with open(path, "wb") as f:
                f.truncate(nbytes)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)

    def head_progress(self) -> tuple[int, int]:
        """(tiles of the head pass written, their NaN/Inf count)."""
        got = self._read_json("head.json") or {}
        return int(got.get("tiles", 0)), int(got.get("bad", 0))

    def head_done(self, tiles: int, bad: int) -> None:
        self._write_json("head.json", {"tiles": tiles, "bad": bad, "tiling": self._tiling})

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- files ----------------------------------------------------------------------------------------------
    def _read_json(self, name: str):
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None

    def _write_json(self, name: str, value) -> None:
        self._atomic(name, lambda f: f.write(json.dumps(value, sort_keys=True).encode()))

    def _atomic(self, name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
