"""NiNo ops: the reference specification, the dispatcher over kernel backends, and small CSR helpers."""

from . import dispatch, reference
from .segment import segment_mean_csr, segment_mean_csr_reference

__all__ = ["dispatch", "reference", "segment_mean_csr", "segment_mean_csr_reference"]
