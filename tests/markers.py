"""Marker images: a white rectangle on black, found again in a processor's output pixels.

Where the rectangle lands is read from the pixels alone, so it checks lmms_vg.geometry
independently of it.
"""

import numpy as np
from PIL import Image


def marker_image(width: int, height: int, box_xyxy) -> Image.Image:
    """Black image with a white rectangle over ``box_xyxy`` (pixels)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box_xyxy
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr)


def landed_cells(pixels: np.ndarray, cell: int) -> np.ndarray:
    """Row-major bool cells of a normalised ``[C, H, W]`` frame holding clearly white pixels (white ~1.9, black/grey < 0.1)."""
    white = (pixels[0] > 1.5).astype(float)
    h, w = white.shape
    grid = white[: h // cell * cell, : w // cell * cell].reshape(h // cell, cell, w // cell, cell).max(axis=(1, 3))
    return grid.reshape(-1) > 0


def white_extent(pixels: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the clearly white pixels of a ``[C, H, W]`` frame, or None."""
    ys, xs = np.nonzero(pixels[0] > 1.5)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def qwen2_vl_frame(pixel_values: np.ndarray, grid_thw, merge: int = 2, patch: int = 14) -> np.ndarray:
    """Qwen2-VL's flattened patches ``[gh*gw, C*T*p*p]`` (merge-grouped) back to one ``[C, H, W]`` frame."""
    _, gh, gw = (int(v) for v in grid_thw)
    p = pixel_values.reshape(gh // merge, gw // merge, merge, merge, 3, -1, patch, patch)[:, :, :, :, :, 0]
    # [bh, bw, mh, mw, C, ph, pw] -> [C, bh, mh, ph, bw, mw, pw]
    return p.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)
