"""Checkpoints shipped with nino_fast, trained here by our own code (``nino-fast collect`` + ``nino-fast train``).

``nino_fast_small.pt``: NiNo, the official architecture at the official hidden width 128 (550K parameters, 2.2 MB,
float32), no word-position encoding; meta-trained on parameter trajectories of small MLPs and ConvNets on sklearn
digits (neither the demo's ConvNet nor the held-out MLP of :mod:`nino_fast.meta.tasks`) in three stages, 93 CPU-min
of one core in all, plus 15 CPU-min of collection (the stores: ``A`` = 63 runs of the default plan, lr
1e-3..5e-3, ``nino-fast collect --out A --max-runs 63``; ``W`` = the wide plan's 104 MLPs and ConvNets, lr
1e-4..5e-3, ``nino-fast collect --out W --plan wide --families mlp convnet``; ``WS`` = a copy of ``W`` plus the
slow plan's 48 deep and wide MLPs at lr 1e-4..1e-3, ``cp -r W WS; nino-fast collect --out WS --plan slow``):

1. ``nino-fast train --data A --out stage1.pt --hid 128 --steps 2500 --init torch --seed 21`` (26.3 CPU-min);
2. ``nino-fast train --data W --out stage2.pt --init-from stage1.pt --hid 128 --steps 1500 --lr 2e-3 --seed 23``
   (35.5 CPU-min);
3. ``nino-fast train --data WS --out nino_fast_small.pt --init-from stage2.pt --hid 128 --steps 500 --lr 1e-3
   --seed 25`` (31.4 CPU-min).

Its ``train_info`` entry records the configuration, steps and CPU time of the last stage, and under ``init_from``
(nested) those of the stages before it.

    from nino_fast import NiNoModel
    from nino_fast.checkpoints import SMALL
    nino = NiNoModel.from_checkpoint(SMALL)
"""

from pathlib import Path

SMALL = Path(__file__).resolve().with_name("nino_fast_small.pt")

__all__ = ["SMALL"]
