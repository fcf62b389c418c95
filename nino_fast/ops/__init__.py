"""NiNo ops: ``torch.ops.nino_fast.*`` (registered once: schema, kernels, fake, autograd), their reference
specification, the backend switch and small CSR helpers."""

# library completes the ops' registration (fakes, autograd, backend switch) on import
from . import dispatch, library, reference
from .segment import segment_mean_csr, segment_mean_csr_reference

__all__ = ["dispatch", "library", "reference", "segment_mean_csr", "segment_mean_csr_reference"]
