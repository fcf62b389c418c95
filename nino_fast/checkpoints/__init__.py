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

``nino_fast_lm.pt`` (2.2 MB): NiNo for transformers, what :class:`nino_fast.NiNo` uses without a ``ckpt`` for a
transformer or any model with token embeddings (:func:`nino_fast.optim.predictors.default_ckpt`). The official
``nino_no_posw.pt`` (MIT, SamsungSAILMontreal/nino; vision and language) fine-tuned on trajectories of 21
character-level GPT-2 and Llama models (:func:`nino_fast.meta.tasks.lm_plan`; 34.4 CPU-min of collection, 1 GB;
the 20 under 1M parameters used for training):

    nino-fast collect --out LM --plan lm --families gpt2 --max-runs 9 --steps 2000
    nino-fast collect --out LM --plan lm --families llama --steps 2000
    nino-fast train --data LM --out nino_fast_lm.pt --init-from nino_no_posw.pt --hid 128 --steps 400 --lr 1e-3 \
        --batch 4 --samples-per-traj 1 --stride-steps 20 --seed 31 --max-params 1000000        # 29.2 CPU-min

No word-position encoding (``wte_pos_enc=False``), so it serves any vocabulary size; the official format (loads in
the official code). How it compares on held-out language models: bench/RESULTS.md, "Transformers: the
language-model checkpoint".

    from nino_fast import NiNoModel
    from nino_fast.checkpoints import LM, SMALL
    nino = NiNoModel.from_checkpoint(SMALL)  # or LM
"""

from pathlib import Path

SMALL = Path(__file__).resolve().with_name("nino_fast_small.pt")
LM = Path(__file__).resolve().with_name("nino_fast_lm.pt")

__all__ = ["LM", "SMALL"]
