"""``NiNo(distributed=True)``: a NiNo step split over the processes of DDP training, and their agreement.

Every process holds the same model and parameters and runs the same wrapper. A NiNo GNN of the official
architecture is run sharded (:func:`nino_fast.distributed.nowcast_sharded`: each process predicts the parameters
on its share of the graph's edges, from its rows of the snapshots and the full snapshots' scaling statistics;
the result is the same on every process and bitwise that of one process at the same torch thread count); other
predictors run whole. Before any parameter is written, one all-reduce tells every process whether all succeeded
and are at the same step. A failed collective leaves the group out of step: later NiNo steps then fail at once,
never hang.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ..distributed import CommError, GraphShard, nowcast_sharded, shard_graph
from ..model import NiNoModel


def check_distributed(timeout) -> timedelta | None:
    """The process group must be initialised; ``timeout`` in seconds (or a timedelta) becomes a timedelta."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "NiNo(distributed=True): torch.distributed is not initialised (torchrun + init_process_group)"
        )
    if timeout is None or isinstance(timeout, timedelta):
        return timeout
    if not timeout > 0:
        raise ValueError(f"NiNo: dist_timeout must be > 0 seconds, got {timeout!r}")
    return timedelta(seconds=float(timeout))


class Agreement:
    """The wrapper's process group, this process's part of the graph, and whether the group still works."""

    def __init__(self, group=None, timeout: timedelta | None = None):
        self.group, self.timeout = group, timeout
        self.broken: str | None = None
        self.shard: GraphShard | None = None
        self.device = torch.device("cpu")

    def setup(self, device: torch.device, predictor, graph) -> None:
        """Make the group once (a collective call: every process builds the wrapper; gloo when the prediction
        runs on the CPU, so that NiNo's collectives never interleave with DDP's) and take this process's shard."""
        if self.group is None:
            backend = "gloo" if device.type == "cpu" else dist.get_backend()
            self.group = dist.new_group(backend=backend, timeout=self.timeout)
        self.device = device
        self.shard = None
        if isinstance(predictor, NiNoModel) and graph is not None:
            if isinstance(graph, GraphShard):  # built (or given) as this process's part
                self.shard = graph
            else:
                self.shard = shard_graph(graph, self.rank, self.world, copy=False)  # views of the graph

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def predict_sharded(self, predictor, snapshots, k: int, backend) -> torch.Tensor:
        """The NiNo GNN's step from this process's rows of the snapshots (a (n_own, ctx) copy, not the
        (n_params, ctx) one) and the full snapshots' scaling statistics: bitwise the step of one process."""
        states = snapshots.rows(self.shard.ids.long())
        scales = snapshots.scale_stats(self.shard.param_shapes, predictor.scale_method)
        return self.collective(
            lambda: nowcast_sharded(predictor, self.shard, states, k, group=self.group, backend=backend, scales=scales)
        )

    def predict_whole(self, predictor, graph, states: torch.Tensor, k: int, backend) -> torch.Tensor:
        """A predictor that runs whole: a NiNo model outside the folded plan (WNN+) on rank 0, its result sent to
        all; the baselines (per-parameter and cheap) on every process, on the same snapshots."""
        if isinstance(predictor, NiNoModel):
            return self.collective(
                lambda: nowcast_sharded(predictor, self.shard, states, k, group=self.group, backend=backend)
            )
        return self.collective(lambda: predictor.nowcast(graph, states, k, backend=backend))

    def collective(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``run()`` unless the group failed before; a failed collective marks it broken."""
        if self.broken is not None:
            raise RuntimeError(f"NiNo: the process group failed in an earlier NiNo step ({self.broken})")
        try:
            return run()
        except CommError as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            raise

    def agree(self, failure: Exception | None, step_idx: int, checksum: int = 0) -> Exception | None:
        """One all-reduce of (failed, step, -step, checksum parts and their negatives): every process fails the step
        if any did, if the processes are not at the same step, or if their snapshots differ (``checksum``: an exact
        digest of them; processes that do not train the same model would each predict their share from their own
        values). After a failed collective the group is out of step: no further collective."""
        if self.broken is not None:
            return failure or RuntimeError(f"NiNo: the process group failed ({self.broken})")
        where = f"NiNo: rank {self.rank}/{self.world}"
        digest = checksum % (1 << 62)
        parts = [digest >> 31, digest & ((1 << 31) - 1)]  # each exact in float64
        values = [float(failure is not None), step_idx, -step_idx, *parts, *(-v for v in parts)]
        flag = torch.tensor(values, dtype=torch.float64, device=self.device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as exc:  # a peer died or timed out between the prediction and here
            self.broken = f"{type(exc).__name__}: {exc}"
            return failure or RuntimeError(
                f"{where}: the processes could not agree on the NiNo step ({exc}); parameters left unchanged"
            )
        if failure is None and flag[0] > 0:
            return RuntimeError(f"{where}: the NiNo step failed on another process; parameters left unchanged")
        if failure is None and flag[1] != -flag[2]:
            return RuntimeError(
                f"{where}: the processes are at different steps ({int(-flag[2])}..{int(flag[1])}); parameters left "
                "unchanged"
            )
        if failure is None and (flag[3] != -flag[5] or flag[4] != -flag[6]):
            return RuntimeError(
                f"{where}: the processes hold different parameters (their snapshots differ); NiNo(distributed=True) "
                "needs every process to train the same model (DDP); parameters left unchanged"
            )
        return failure
