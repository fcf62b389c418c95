"""Checkpoints shipped with nino_fast, trained here by our own code (``nino-fast collect`` + ``nino-fast train``).

``nino_fast_small.pt``: NiNo, the official architecture with hidden width 64 (152K parameters, 0.6 MB, float32),
no word-position encoding; meta-trained on parameter trajectories of small MLPs and ConvNets on sklearn digits
(neither the demo's ConvNet nor the held-out MLP of :mod:`nino_fast.meta.tasks`): 63 runs of the default plan
(``nino-fast collect --max-runs 63``, ~10 CPU-min), then ``nino-fast train --hid 64 --steps 2500 --init torch``
(2500 steps x 16 windows, 26.5 CPU-min on one core). Its ``train_info`` entry records the configuration, steps
and CPU time.

    from nino_fast import NiNoModel
    from nino_fast.checkpoints import SMALL
    nino = NiNoModel.from_checkpoint(SMALL)
"""

from pathlib import Path

SMALL = Path(__file__).resolve().with_name("nino_fast_small.pt")

__all__ = ["SMALL"]
