"""NiNo ops: the reference specification and the dispatcher over kernel backends."""

from . import dispatch, reference

__all__ = ["dispatch", "reference"]
