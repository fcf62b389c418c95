"""Meta-training NiNo with nino_fast: trajectory collection, training windows, a differentiable forward over the
fused ops, and the trainer.

- :mod:`.tasks`   the small models (MLPs, ConvNets on sklearn digits, char-level GPT-2/Llama on stdlib source),
                  the training plans and the held-out tasks
- :mod:`.store`   the on-disk trajectory format (memory-mapped float16 rows + JSON manifest)
- :mod:`.collect` ``nino-fast collect``: run the plan into a store (resumable, CPU-time budget)
- :mod:`.data`    windows -> scaled inputs and K-horizon targets, batched as one CSR graph
- :mod:`.forward` the differentiable forward (folded plan on :mod:`nino_fast.ops.dispatch`, layerwise, oracle)
- :mod:`.train`   ``nino-fast train``: the GNN or the WNN+ MLP; the paper's loss, AdamW + cosine, clipping,
                  NaN-safe, resumable
- :mod:`.cli`     the two subcommands, registered on ``nino-fast``
"""
