"""Checkpoints shipped with nino_fast, trained here by our own code (``nino-fast collect`` + ``nino-fast train``).

``nino_fast_small.pt``: NiNo, the official architecture with hidden width 64 (152K parameters, 0.6 MB, float32),
no word-position encoding; meta-trained on parameter trajectories of small MLPs and ConvNets on sklearn digits
(neither the demo's ConvNet nor the held-out MLP of :mod:`nino_fast.meta.tasks`) in four stages, 118 CPU-min of
one core in all (the stores: ``A`` = 63 runs of the default plan, lr 1e-3..5e-3, ``nino-fast collect --out A
--max-runs 63``; ``W`` = the wide plan's 104 MLPs and ConvNets, lr 1e-4..5e-3, ``nino-fast collect --out W --plan
wide --families mlp convnet``; ``B`` = ``W``'s runs plus ``A``'s, collected into one store):

1. ``nino-fast train --data A --hid 64 --steps 2500 --init torch`` (26.5 CPU-min);
2. ``nino-fast train --data B --init-from <stage 1> --hid 64 --steps 1000 --lr 1e-3`` (8.4 CPU-min);
3. ``nino-fast train --data B --init-from <stage 2> --hid 64 --steps 4000 --lr 2e-3 --seed 1`` (36.0 CPU-min);
4. ``nino-fast train --data W --init-from <stage 3> --hid 64 --steps 4000 --lr 2e-3 --seed 3`` (47.2 CPU-min).

Its ``train_info`` entry records the configuration, steps and CPU time of the last stage, and under ``init_from``
(nested) those of the stages before it.

    from nino_fast import NiNoModel
    from nino_fast.checkpoints import SMALL
    nino = NiNoModel.from_checkpoint(SMALL)
"""

from pathlib import Path

SMALL = Path(__file__).resolve().with_name("nino_fast_small.pt")

__all__ = ["SMALL"]
