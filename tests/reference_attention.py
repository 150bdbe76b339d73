"""The tests' reference eager attention: :mod:`lmms_vg.reference` (independent of the engine; shared with ``lmms-vg check-family``)."""

from lmms_vg.reference import REFERENCE, reference_attention

__all__ = ["REFERENCE", "reference_attention"]
