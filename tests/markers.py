"""Marker images: a white rectangle on black, found again in a processor's output pixels.

Where the rectangle lands is read from the pixels alone (un-normalised with the processor's own
mean and std), so it checks lmms_vg.geometry independently of it. The helpers are the conformance
battery's (:mod:`lmms_vg.conformance`), which ``lmms-vg check-family`` runs on any family.
"""

import numpy as np

from lmms_vg.conformance import frame, landed_cells, marker_image, qwen2_vl_frame, white_extent


def raw(pixels: np.ndarray, image_processor) -> np.ndarray:
    """A normalised ``[C, ...]`` frame back to 0..1 with the processor's own mean and std."""
    shape = (-1,) + (1,) * (pixels.ndim - 1)
    mean = np.asarray(image_processor.image_mean, dtype=np.float64).reshape(shape)
    std = np.asarray(image_processor.image_std, dtype=np.float64).reshape(shape)
    return pixels * std + mean


__all__ = ["frame", "landed_cells", "marker_image", "qwen2_vl_frame", "raw", "white_extent"]
