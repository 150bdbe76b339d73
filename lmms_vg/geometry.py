"""Boxes from original pixels to the model's token grid, through the model's own preprocessing.

A transform is an axis-aligned affine map (scale, then offset) from original pixel coordinates
to the model's input frame, plus the token grid laid over that frame. Each preprocessing step
that a processor performs (pad to square, resize, centre crop, Qwen2-VL's smart resize) is one
composition; boxes then cover every cell they overlap (SPEC section 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

BoxFormat = Literal["xyxy", "xywh"]


@dataclass(frozen=True)
class ImageTransform:
    """x_in = x * scale_x + offset_x (same for y); the token grid is ``rows x cols`` cells of ``cell`` x ``cell_h`` pixels
    of that frame (square cells unless ``cell_y`` is given)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    rows: int
    cols: int
    cell: float
    width: int  # original image size
    height: int
    cell_y: float | None = None  # a cell's height where it differs from its width (a frame the grid was not cut from)

    @property
    def cell_h(self) -> float:
        return self.cell if self.cell_y is None else self.cell_y


@dataclass(frozen=True)
class Affine:
    """A preprocessing chain so far: x_new = x * scale_x + offset_x (y alike), from original pixels."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def then(self, scale_x: float, scale_y: float, offset_x: float = 0.0, offset_y: float = 0.0) -> Affine:
        """This step followed by another (scale, then offset)."""
        return Affine(
            self.scale_x * scale_x, self.scale_y * scale_y, self.offset_x * scale_x + offset_x, self.offset_y * scale_y + offset_y
        )

    def grid(self, rows: int, cols: int, cell: float, width: int, height: int, cell_y: float | None = None) -> ImageTransform:
        """The chain with the token grid laid over its frame."""
        return ImageTransform(self.scale_x, self.scale_y, self.offset_x, self.offset_y, rows, cols, cell, width, height, cell_y)


@dataclass(frozen=True)
class BoxCells:
    """The token cells under a sample's boxes: ``mask`` bool ``[rows * cols]`` (row-major), with what happened to the boxes."""

    mask: np.ndarray
    n_boxes: int
    n_clipped: int
    n_empty: int


def to_xyxy(box: Sequence[float], fmt: BoxFormat) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers, got {list(box)!r}")
    x0, y0, a, b = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, a, b)):
        raise ValueError(f"box {list(box)!r} has a coordinate that is not a finite number")
    if fmt == "xywh":
        return x0, y0, x0 + a, y0 + b
    if fmt == "xyxy":
        return x0, y0, a, b
    raise ValueError(f"box format {fmt!r} is not 'xyxy' or 'xywh'")


def llava_transform(
    width: int,
    height: int,
    *,
    pad_to_square: bool,
    shortest_edge: int,
    crop: tuple[int, int] | None,
    patch: int,
) -> ImageTransform:
    """LLaVA-family preprocessing: optional expand2square, shortest-edge resize, optional centre crop."""
    t, w, h = _padded(width, height, pad_to_square)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)  # transformers' rounding
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    t = t.then(new_w / w, new_h / h)
    if crop is not None:
        crop_h, crop_w = crop
        t = t.then(1.0, 1.0, -((new_w - crop_w) // 2), -((new_h - crop_h) // 2))
        new_w, new_h = crop_w, crop_h
    return t.grid(new_h // patch, new_w // patch, float(patch), width, height)


def _padded(width: int, height: int, pad_to_square: bool) -> tuple[Affine, int, int]:
    """The identity, or the image pasted at the centre of a max-side square (LLaVA-1.5 expand2square); with the new size."""
    if not pad_to_square:
        return Affine(), width, height
    side = max(width, height)
    return Affine(offset_x=(side - width) // 2, offset_y=(side - height) // 2), side, side


# qwen_vl_utils 0.0.14 (vision_process.py): fetch_image's pixel limits, in tokens of (patch * merge)^2 pixels
FETCH_MIN_TOKENS, FETCH_MAX_TOKENS, FETCH_MAX_RATIO = 4, 16384, 200


def qwen_fetch_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """``qwen_vl_utils.fetch_image``'s resize of an image (its own ``smart_resize``, default limits): (width, height).

    Qwen's model cards, lmms-eval's Qwen models and the authors' grounding code prepare every image
    with it before the processor resizes again. Its rounding differs from transformers' ``smart_resize``
    (the floor branch keeps no ``factor`` minimum), so it is written out here, and tested against the package.
    """
    min_pixels, max_pixels = FETCH_MIN_TOKENS * factor**2, FETCH_MAX_TOKENS * factor**2
    if max(height, width) / min(height, width) > FETCH_MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {FETCH_MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return w_bar, h_bar


def qwen2_vl_transform(
    width: int,
    height: int,
    *,
    patch: int,
    merge: int,
    min_pixels: int,
    max_pixels: int,
    pad_to_square: bool = False,
    fetch: bool = True,
) -> ImageTransform:
    """Qwen2-VL: optional pad to square, ``fetch_image``'s resize (``fetch``), the processor's smart resize to multiples of
    patch*merge within its pixel limits; one token per merged 2x2 patch block.

    Each resize maps the whole image onto the whole new frame. With ``fetch`` the frame is fetch_image's,
    the processor's grid laid over it (cells ``fetched / grid`` wide and high), as the authors map boxes
    (measure_attention.py: ``convert_bbox_after_resize`` to that frame, then ``get_tokens_covering_bbox``):
    the same cells, computed in the same order, so that a box edge on a cell border falls as theirs does.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision needed

    factor = patch * merge
    t, w, h = _padded(width, height, pad_to_square)
    fetched_w, fetched_h = qwen_fetch_size(w, h, factor) if fetch else (w, h)
    new_h, new_w = smart_resize(fetched_h, fetched_w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    rows, cols = new_h // factor, new_w // factor
    if fetch:
        return t.then(fetched_w / w, fetched_h / h).grid(rows, cols, fetched_w / cols, width, height, fetched_h / rows)
    return t.then(new_w / w, new_h / h).grid(rows, cols, float(factor), width, height)


def squash_transform(width: int, height: int, *, size: int, patch: int, merge: int, pad_to_square: bool = False) -> ImageTransform:
    """VILA's ``resize``: the image resized to ``size`` x ``size`` whatever its shape (or padded to square first);
    ``size // patch`` patches a side, merged ``merge`` x ``merge`` into one token (an odd side padded with one more)."""
    t, w, h = _padded(width, height, pad_to_square)
    side = math.ceil((size // patch) / merge)
    return t.then(size / w, size / h).grid(side, side, float(patch * merge), width, height)


def box_cells(boxes: Iterable[Sequence[float]], fmt: BoxFormat, transform: ImageTransform) -> BoxCells:
    """Union of the cells overlapped by ``boxes`` (original pixels), clipped to the image first."""
    mask = np.zeros((transform.rows, transform.cols), dtype=bool)
    n = clipped = empty = 0
    for box in boxes:
        n += 1
        x0, y0, x1, y1 = to_xyxy(box, fmt)
        cx0, cy0 = min(max(x0, 0.0), transform.width), min(max(y0, 0.0), transform.height)
        cx1, cy1 = min(max(x1, 0.0), transform.width), min(max(y1, 0.0), transform.height)
        clipped += (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
        if cx1 <= cx0 or cy1 <= cy0:
            empty += 1
            continue
        ix0, ix1 = cx0 * transform.scale_x + transform.offset_x, cx1 * transform.scale_x + transform.offset_x
        iy0, iy1 = cy0 * transform.scale_y + transform.offset_y, cy1 * transform.scale_y + transform.offset_y
        c0, c1 = max(math.floor(ix0 / transform.cell), 0), min(math.ceil(ix1 / transform.cell), transform.cols)
        r0, r1 = max(math.floor(iy0 / transform.cell_h), 0), min(math.ceil(iy1 / transform.cell_h), transform.rows)
        if c1 <= c0 or r1 <= r0:  # the box lies entirely in a region the crop removed
            empty += 1
            continue
        mask[r0:r1, c0:c1] = True
    return BoxCells(mask.reshape(-1), n, clipped, empty)
