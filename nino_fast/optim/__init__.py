"""NiNo in training loops: :class:`NiNo`, a ``torch.optim.Optimizer`` around any optimizer that periodically
nowcasts the parameters (:mod:`.wrapper`), built from the k schedule (:mod:`.schedule`), the snapshot buffer
(:mod:`.snapshots`), the predictors (:mod:`.predictors`), the checks of a saved state (:mod:`.state`) and the
agreement of the processes in DDP training (:mod:`.agreement`)."""

from .predictors import load_predictor
from .schedule import k_schedule
from .wrapper import NiNo

__all__ = ["NiNo", "k_schedule", "load_predictor"]
