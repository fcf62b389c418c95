"""Triton kernels of nino_fast (installed as ``nino_fast.triton_kernels``; registered by
nino_fast/ops/triton_backend.py as the ``triton`` implementation of the ops).

Modules: ``film_mean``, ``edge_mlp``, ``edge_film_mean`` (kernel + host launcher each), ``csr_split`` (the
deterministic long-row split shared by the two CSR reductions), ``tiles`` (shared device functions), ``utils``
(host-side checks and launch settings).
"""
