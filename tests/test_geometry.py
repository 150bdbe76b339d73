"""Box geometry against what the real processors do to the pixels."""

import numpy as np
import pytest
from markers import landed_cells, marker_image, raw
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lmms_vg import geometry


def authors_transform(width: int, height: int, *, size: int = 336, patch: int = 14) -> geometry.ImageTransform:
    """The authors' mapping (measure_attention.py): each axis scaled to ``size``, no pad offset (right only for square images)."""
    return geometry.ImageTransform(size / width, size / height, 0.0, 0.0, size // patch, size // patch, float(patch), width, height)


def cells_from_tokens(tokens, rows: int = 24, cols: int = 24) -> np.ndarray:
    """VGMED v1 ``gt_tokens`` ([x, y] cells of a 24x24 grid) as a row-major bool mask."""
    mask = np.zeros((rows, cols), dtype=bool)
    for x, y in tokens:
        mask[int(y), int(x)] = True
    return mask.reshape(-1)


MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (150, 150)])
@pytest.mark.parametrize("pad", [True, False])
def test_llava_cells_match_processor(size, pad):
    w, h = size
    box = (int(w * 0.55), int(h * 0.2), int(w * 0.8), int(h * 0.45))
    proc = LlavaImageProcessorPil(
        do_pad=pad, size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}, image_mean=MEAN, image_std=STD
    )
    pixels = proc(images=[marker_image(w, h, box)], return_tensors="np")["pixel_values"][0]
    t = geometry.llava_transform(w, h, pad_to_square=pad, shortest_edge=112, crop=(112, 112), patch=14)
    cells = geometry.box_cells([box], "xyxy", t)
    landed = landed_cells(raw(pixels, proc), 14)
    assert landed.any()
    # every cell the marker landed in is covered; covered cells are the landed ones plus at most a one-cell border
    assert not (landed & ~cells.mask).any()
    grid = cells.mask.reshape(8, 8)
    rows, cols = np.nonzero(grid)
    lrows, lcols = np.nonzero(landed.reshape(8, 8))
    assert rows.min() >= lrows.min() - 1 and rows.max() <= lrows.max() + 1
    assert cols.min() >= lcols.min() - 1 and cols.max() <= lcols.max() + 1


def test_qwen2_vl_cells_match_processor():
    w, h = 130, 90
    box = (70, 10, 120, 50)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    out = proc(images=[marker_image(w, h, box)], return_tensors="np")
    _, gh, gw = out["image_grid_thw"][0]
    t_ = geometry.qwen2_vl_transform(w, h, patch=14, merge=2, min_pixels=56 * 56, max_pixels=112 * 112)
    assert (t_.rows, t_.cols) == (gh // 2, gw // 2)
    cells = geometry.box_cells([box], "xyxy", t_).mask.reshape(t_.rows, t_.cols)
    # rebuild the image from Qwen2-VL's flattened patches: [gh/2, gw/2, 2, 2, C, T, 14, 14]
    patches = out["pixel_values"].reshape(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)
    white = (raw(patches[:, :, :, :, 0, 0], proc) > 0.75).any(axis=(2, 3, 4, 5))
    assert white.any() and not (white & ~cells).any()


def test_pad_offset_matters_on_non_square_images():
    """A box in a wide image: the authors' no-offset mapping puts it in the wrong rows."""
    w, h = 336, 168  # padded to 336x336, image pasted 84 px down
    box = [[0, 0, 56, 56]]
    right = geometry.box_cells(
        box, "xywh", geometry.llava_transform(w, h, pad_to_square=True, shortest_edge=336, crop=(336, 336), patch=14)
    )
    authors = geometry.box_cells(box, "xywh", authors_transform(w, h))
    right_rows = np.nonzero(right.mask.reshape(24, 24).any(1))[0]
    authors_rows = np.nonzero(authors.mask.reshape(24, 24).any(1))[0]
    assert right_rows.tolist() == list(range(6, 10))  # (0+84)/14 = 6 .. ceil((56+84)/14) = 10
    assert authors_rows.tolist() == list(range(8))  # y scaled by 2 and no offset
    # on a square image both agree
    sq = geometry.llava_transform(500, 500, pad_to_square=True, shortest_edge=336, crop=(336, 336), patch=14)
    a = geometry.box_cells([[100, 200, 50, 60]], "xywh", sq).mask
    b = geometry.box_cells([[100, 200, 50, 60]], "xywh", authors_transform(500, 500)).mask
    assert (a == b).all()


def test_vgmed_v1_gt_tokens_convention():
    """VGMED v1 ships gt_tokens as [x, y] cells of 24x24 at 336 px: reproduced for a square image."""
    t = geometry.llava_transform(512, 512, pad_to_square=True, shortest_edge=336, crop=(336, 336), patch=14)
    box_xywh = [128, 64, 64, 96]  # 336/512 scale: x 84..126 -> cells 6..9, y 42..105 -> cells 3..7 (ceil 7.5 = 8)
    gt_tokens = [[x, y] for y in range(3, 8) for x in range(6, 9)]
    assert (geometry.box_cells([box_xywh], "xywh", t).mask == cells_from_tokens(gt_tokens)).all()


def test_border_multiple_and_bad_boxes():
    t = geometry.llava_transform(140, 140, pad_to_square=True, shortest_edge=140, crop=(140, 140), patch=14)
    border = geometry.box_cells([[126, 126, 140, 140]], "xyxy", t)
    assert border.mask.reshape(10, 10)[9, 9] and border.mask.sum() == 1
    outside = geometry.box_cells([[130, 130, 200, 200]], "xyxy", t)
    assert outside.n_clipped == 1 and outside.mask.reshape(10, 10)[9, 9]
    two = geometry.box_cells([[0, 0, 14, 14], [126, 0, 140, 14]], "xyxy", t)
    assert two.mask.sum() == 2 and two.n_boxes == 2
    empty = geometry.box_cells([[10, 10, 0, 5]], "xywh", t)
    assert empty.n_empty == 1 and not empty.mask.any()
    with pytest.raises(ValueError, match="4 numbers"):
        geometry.box_cells([[1, 2, 3]], "xyxy", t)


# ---------------------------------------------------------------- exact values where rounding or a boundary decides
def test_padding_offsets_floor_an_odd_margin():
    """expand2square pastes at (side - size) // 2: an odd margin floors (49, not 49.5), on either axis."""
    tall = geometry.llava_transform(300, 201, pad_to_square=True, shortest_edge=300, crop=None, patch=10)
    assert (tall.offset_x, tall.offset_y, tall.scale_x, tall.scale_y) == (0, 49, 1.0, 1.0)
    wide = geometry.llava_transform(201, 300, pad_to_square=True, shortest_edge=300, crop=None, patch=10)
    assert (wide.offset_x, wide.offset_y) == (49, 0)
    assert (wide.rows, wide.cols, wide.cell, wide.width, wide.height) == (30, 30, 10.0, 201, 300)


def test_centre_crop_offsets_floor_an_odd_excess():
    """The crop starts at (new - crop) // 2 on each axis: 31 // 2 = 15 and 11 // 2 = 5 (not 15.5, 5.5 or a third)."""
    t = geometry.llava_transform(130, 110, pad_to_square=False, shortest_edge=110, crop=(99, 99), patch=11)
    assert (t.offset_x, t.offset_y, t.scale_x, t.scale_y) == (-15, -5, 1.0, 1.0)
    assert (t.rows, t.cols) == (9, 9)


def test_qwen_geometry_fetches_by_default_and_honours_its_limits_and_padding():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    limits = {"patch": 14, "merge": 2, "min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert geometry.qwen2_vl_transform(130, 90, **limits) == geometry.qwen2_vl_transform(130, 90, **limits, fetch=True)
    assert geometry.qwen2_vl_transform(130, 90, **limits) != geometry.qwen2_vl_transform(130, 90, **limits, fetch=False)
    t = geometry.qwen2_vl_transform(130, 90, **limits, fetch=False)  # the processor's resize of the original only
    new_h, new_w = smart_resize(90, 130, factor=28, min_pixels=56 * 56, max_pixels=112 * 112)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y) == (new_w / 130, new_h / 90, 0.0, 0.0)
    assert (t.rows, t.cols, t.cell, t.cell_y, t.width, t.height) == (new_h // 28, new_w // 28, 28.0, None, 130, 90)
    # a min_pixels above the default: a 28 px image grows to 3 x 3 tokens (the default's floor gives 2 x 2)
    small = geometry.qwen2_vl_transform(28, 28, patch=14, merge=2, min_pixels=8 * 28 * 28, max_pixels=112 * 112, fetch=False)
    assert (small.rows, small.cols) == (3, 3)
    padded = geometry.qwen2_vl_transform(130, 90, **limits, fetch=False, pad_to_square=True)
    assert padded.offset_y == 20 * padded.scale_y and padded.offset_x == 0


def test_squash_geometry_defaults_unpadded_and_counts_whole_patches():
    t = geometry.squash_transform(200, 100, size=70, patch=14, merge=2)
    assert (t.scale_x, t.scale_y, t.offset_x, t.offset_y, t.cell) == (0.35, 0.7, 0.0, 0.0, 28.0)
    # SigLIP sees whole patches only: 85 px is 6 patches of 14 (not 6.07), folded into 3 x 3 tokens
    assert (
        geometry.squash_transform(100, 100, size=85, patch=14, merge=2).rows,
        geometry.squash_transform(100, 100, size=85, patch=14, merge=2).cols,
    ) == (3, 3)
    padded = geometry.squash_transform(201, 300, size=100, patch=10, merge=2, pad_to_square=True)
    assert padded.offset_x == pytest.approx(49 / 3) and padded.scale_x == pytest.approx(1 / 3)


def crop_transform() -> geometry.ImageTransform:
    """A 200 x 100 image resized to 224 x 112 and centre-cropped to 112 x 112: x 56..168 of the resize is kept."""
    return geometry.llava_transform(200, 100, pad_to_square=False, shortest_edge=112, crop=(112, 112), patch=14)


def test_box_cells_count_clipped_and_empty_boxes_one_by_one():
    t = geometry.llava_transform(100, 100, pad_to_square=False, shortest_edge=112, crop=(112, 112), patch=14)
    inside = geometry.box_cells([(0.5, 0.5, 10, 10), (0, 0, 0.5, 0.5)], "xyxy", t)  # near the origin: nothing to clip
    assert (inside.n_boxes, inside.n_clipped, inside.n_empty) == (2, 0, 0) and inside.mask.reshape(8, 8)[0, 0]
    clipped = geometry.box_cells([(-5, 10, 20, 20), (90, 90, 120, 130)], "xyxy", t)
    assert (clipped.n_clipped, clipped.n_empty) == (2, 0)
    # two empty boxes (zero height; outside the image), then a real one: each counted, and the real one still mapped
    found = geometry.box_cells([(10, 30, 40, 30), (150, 10, 160, 20), (80, 80, 99, 99)], "xyxy", t)
    # 80..99 px x 1.12 = 89.6..110.9 in the 112 px frame: cells 6 and 7 of 14 px on each axis
    assert (found.n_empty, found.n_clipped) == (2, 1) and found.mask.reshape(8, 8)[6:, 6:].all() and found.mask.sum() == 4
    assert found.mask.shape == (64,)


def test_a_box_the_crop_removed_is_empty_on_either_axis():
    t = crop_transform()  # the crop keeps original x 50..150, every row
    left = geometry.box_cells([(0, 20, 40, 60), (60, 20, 90, 60)], "xyxy", t)
    assert left.n_empty == 1 and left.mask.any()  # only the second box lands
    tall = geometry.llava_transform(100, 200, pad_to_square=False, shortest_edge=100, crop=(100, 100), patch=10)
    top = geometry.box_cells([(20, 0, 60, 40)], "xyxy", tall)  # the crop keeps original y 50..150 (scale 1)
    assert top.n_empty == 1 and not top.mask.any()
    edge = geometry.box_cells([(20, 0, 60, 50), (0, 60, 0, 90)], "xyxy", tall)  # ends where the crop starts; zero width
    assert edge.n_empty == 2 and not edge.mask.any()
    again = geometry.box_cells([(0, 60, 0, 90), (20, 0, 60, 50), (20, 0, 60, 40)], "xyxy", tall)  # the crop-removed ones last
    assert again.n_empty == 3
