"""Checkpoints shipped with nino_fast, trained here by our own code (``nino-fast collect`` + ``nino-fast train``).

``nino_fast_small.pt``: NiNo, the official architecture with hidden width 64 (152K parameters, 0.6 MB, float32),
no word-position encoding; meta-trained on parameter trajectories of small MLPs and ConvNets on sklearn digits
(neither the demo's ConvNet nor the held-out MLP of :mod:`nino_fast.meta.tasks`) in two stages:

1. 63 runs of the default plan (lr 1e-3..5e-3; ``nino-fast collect --out A --max-runs 63``), then
   ``nino-fast train --data A --hid 64 --steps 2500 --init torch`` (26.5 CPU-min on one core);
2. a store of the wide plan's MLPs and ConvNets (lr 1e-4..5e-3; ``nino-fast collect --out B --plan wide
   --families mlp convnet``, 104 runs) plus the same 63 default-plan runs (``nino-fast collect --out B
   --max-runs 63``), then ``nino-fast train --data B --init-from <stage 1> --hid 64 --steps 1000 --lr 1e-3``
   (8.4 CPU-min).

Its ``train_info`` entry records the configuration, steps and CPU time of stage 2, and under ``init_from`` those
of stage 1.

    from nino_fast import NiNoModel
    from nino_fast.checkpoints import SMALL
    nino = NiNoModel.from_checkpoint(SMALL)
"""

from pathlib import Path

SMALL = Path(__file__).resolve().with_name("nino_fast_small.pt")

__all__ = ["SMALL"]
