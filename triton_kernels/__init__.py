"""Triton kernels of nino_fast (installed as ``nino_fast.triton_kernels``); see nino_fast/ops/triton_backend.py."""
