"""The authors' pipeline (Guimeng-Leo-Liu/Medical-MLLMs-Fail @ c7263dd): Qwen's two-step image resize and grounding
normalised as they divide.

The Qwen image path is held equal to ``qwen_vl_utils.fetch_image`` (the installed package itself; its
torchvision import, used for videos only, stubbed) followed by each Qwen architecture's processor with
the authors' pixel limits; box cells to a transcription of their ``convert_bbox_after_resize`` and
``get_tokens_covering_bbox``; the metrics to a transcription of their ``compute_metrics``.
"""

import importlib
import math
import sys
import types

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from lmms_vg import engine, geometry, metrics
from lmms_vg.families.qwen2_vl import Qwen2VLAdapter

AUTHORS_PIXELS = {"min_pixels": 784, "max_pixels": 50176}  # measure_attention.py: processor.image_processor.{min,max}_pixels
SIZES = [(300, 200), (200, 300), (640, 427), (427, 640), (333, 517), (512, 512), (1001, 77), (23, 31)]


@pytest.fixture(scope="module")
def qwen_vl_utils():
    """The installed qwen_vl_utils, imported with a stand-in for torchvision (it needs it for videos only)."""
    stub = types.ModuleType("torchvision")
    stub.__version__ = "0.0.0"
    stub.io = types.ModuleType("torchvision.io")
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.io", "torchvision.transforms")}
    sys.modules.update({"torchvision": stub, "torchvision.io": stub.io, "torchvision.transforms": stub.transforms})
    try:
        for name in [m for m in sys.modules if m.startswith("qwen_vl_utils")]:
            del sys.modules[name]
        yield importlib.import_module("qwen_vl_utils.vision_process")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [m for m in sys.modules if m.startswith("qwen_vl_utils")]:
            del sys.modules[name]


@pytest.mark.parametrize("patch", [14, 16])  # Qwen2/2.5-VL, Qwen3-VL
def test_fetch_size_equals_qwen_vl_utils(qwen_vl_utils, patch):
    factor = patch * 2
    # and the max- and min-pixel branches, a product of exactly max_pixels, an aspect ratio of exactly 200 (allowed)
    for width, height in [*SIZES, (4000, 3900), (15, 12), (128 * factor, 128 * factor), (200, 1)]:
        expected_h, expected_w = qwen_vl_utils.smart_resize(height, width, factor=factor)
        assert geometry.qwen_fetch_size(width, height, factor) == (expected_w, expected_h), (width, height)
    with pytest.raises(ValueError, match="aspect ratio"):
        geometry.qwen_fetch_size(1000, 4, 28)


def authors_cells(box, original_size, fetched_size, grid):
    """measure_attention.py: convert_bbox_after_resize (xyxy) then get_tokens_covering_bbox on fetch_image's frame."""
    w_orig, h_orig = original_size
    w_new, h_new = fetched_size
    scale_x, scale_y = w_new / w_orig, h_new / h_orig
    x_min, y_min, x_max, y_max = box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y
    num_rows, num_cols = grid
    token_width, token_height = w_new / num_cols, h_new / num_rows
    x_min_token = int(max(np.floor(x_min / token_width), 0))
    y_min_token = int(max(np.floor(y_min / token_height), 0))
    x_max_token = int(min(int(np.ceil(x_max / token_width)), num_cols))
    y_max_token = int(min(int(np.ceil(y_max / token_height)), num_rows))
    return {(x, y) for x in range(x_min_token, x_max_token) for y in range(y_min_token, y_max_token)}


@pytest.mark.parametrize("checkpoint", ["qwen2_vl_dir", "qwen2_5_vl_dir", "qwen3_vl_dir"])
def test_image_pipeline_and_box_cells_equal_fetch_image_then_the_processor(checkpoint, request, qwen_vl_utils):
    folder = request.getfixturevalue(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    engine.install(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder, **AUTHORS_PIXELS)
    adapter = Qwen2VLAdapter(model, types.SimpleNamespace(tokenizer=tokenizer, image_processor=processor))
    patch = processor.patch_size
    for n, (width, height) in enumerate(SIZES[:-1]):
        image = random_image(width, height, seed=n)
        fetched = qwen_vl_utils.fetch_image({"image": image}, image_patch_size=patch)
        expected = processor(images=[fetched], return_tensors="pt")
        ours = adapter.pixel_inputs([image])
        assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"]), (width, height)
        assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0), (width, height)
        grid = tuple(int(v) // 2 for v in expected["image_grid_thw"][0, 1:])
        t = adapter.transform(image)
        assert (t.rows, t.cols) == grid
        for box in ([0.1 * width, 0.2 * height, 0.55 * width, 0.7 * height], [0.71 * width, 0.05 * height, width, 0.33 * height]):
            cells = geometry.box_cells([box], "xyxy", t).mask.reshape(grid)
            assert {(x, y) for y, x in zip(*np.nonzero(cells))} == authors_cells(box, image.size, fetched.size, grid), (width, height, box)
    one_step = Qwen2VLAdapter(model, types.SimpleNamespace(tokenizer=tokenizer, image_processor=processor), fetch=False)
    if patch == 14:  # the example: a 300x200 image gets 6x10 cells through both steps, 6x9 through the processor's alone
        assert (adapter.transform(random_image(300, 200)).rows, adapter.transform(random_image(300, 200)).cols) == (6, 10)
        assert (one_step.transform(random_image(300, 200)).rows, one_step.transform(random_image(300, 200)).cols) == (6, 9)


def test_transparency_is_laid_over_white_as_qwen_vl_utils_does(qwen2_vl_dir, qwen_vl_utils):
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_dir).eval()
    processor = AutoImageProcessor.from_pretrained(qwen2_vl_dir)
    adapter = Qwen2VLAdapter(model, types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(qwen2_vl_dir), image_processor=processor))
    rgba = np.zeros((90, 130, 4), dtype=np.uint8)
    rgba[..., 0], rgba[20:40, 30:60, 3] = 200, 255  # transparent but for one red rectangle
    image = Image.fromarray(rgba, "RGBA")
    assert np.array_equal(np.asarray(adapter.model_image(image)), np.asarray(qwen_vl_utils.fetch_image({"image": image})))


def authors_metrics(att_maps, general_att_maps, gt_tokens, token_shape):
    """measure_attention.py compute_metrics with its vectorised AR, KL and JS, transcribed (numpy, no epsilon in the division)."""
    num_tokens, num_cols = token_shape[0] * token_shape[1], token_shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = att_maps / general_att_maps
        idx = np.array([t[1] * num_cols + t[0] for t in gt_tokens])
        ar = np.sum(normalized[..., idx], axis=-1) / (np.sum(normalized, axis=-1) / num_tokens * len(idx) + 1e-8)
        gt = np.zeros(normalized.shape[-1])
        for x, y in gt_tokens:
            gt[y * num_cols + x] = 1
        gt = gt / gt.sum()
        att = normalized / (normalized.sum(axis=-1, keepdims=True) + 1e-8)
        kl = np.sum(np.clip(gt, 1e-12, 1) * np.log(np.clip(gt, 1e-12, 1) / np.clip(att, 1e-12, 1)), axis=-1)
        m = 0.5 * (att + gt)
        js = 0.5 * (np.sum(att * np.log((att + 1e-8) / (m + 1e-8)), axis=-1) + np.sum(gt * np.log((gt + 1e-8) / (m + 1e-8)), axis=-1))
    return ar, kl, js


def test_grounding_metrics_divide_as_the_authors_do_and_name_an_exact_zero():
    """Tiny reference weights (a sharp model's, down to 1e-17) give the authors' numbers, which an epsilon would not; an exact
    zero (bf16 underflow) leaves that layer undefined, counted, where theirs would be inf or NaN."""
    rng = np.random.default_rng(0)
    rows, cols, layers = 4, 5, 3
    question = rng.random((layers, rows * cols)) + 0.01
    reference = rng.random((layers, rows * cols)) + 0.01
    reference[1, [3, 7, 11]] = [1e-17, 3e-16, 2e-15]  # a sharp layer
    reference[2, 5] = 0.0  # underflow
    box = np.zeros((rows, cols), dtype=bool)
    box[1:3, 2:4] = True
    tokens = [(x, y) for y, x in zip(*np.nonzero(box))]
    ratio, undefined = metrics.relative_attention(torch.from_numpy(question), torch.from_numpy(reference))
    values = metrics.grounding_metrics(ratio, torch.from_numpy(box.reshape(-1)), undefined)
    ar, kl, js = authors_metrics(question, reference, tokens, (rows, cols))
    assert undefined.tolist() == [False, False, True]
    for ours, theirs in ((values["ar"], ar), (values["kl"], kl), (values["js"], js)):
        np.testing.assert_allclose(ours[:2], theirs[:2], rtol=1e-9, atol=0)
        assert math.isnan(ours[2])
    with_epsilon = metrics.grounding_metrics(
        metrics.normalise_by_reference(torch.from_numpy(question), torch.from_numpy(reference)), torch.from_numpy(box.reshape(-1))
    )
    assert abs(with_epsilon["kl"][1] - kl[1]) > 1e-3  # what the epsilon did to a sharp layer


def test_layer_means_leave_out_undefined_layers_and_count_them():
    from lmms_vg import aggregate

    nan = float("nan")
    records = [
        {"ar": [1.0, 2.0, nan], "kl": [0.5, 0.3, nan], "js": [0.1, 0.2, nan], "iou": [0.0, 0.5, nan], "zero_reference_layers": 1},
        {"ar": [3.0, 4.0, 5.0], "kl": [0.7, 0.1, 0.9], "js": [0.3, 0.4, 0.5], "iou": [1.0, 0.5, 0.0]},
        {"ar": [nan, nan, nan], "kl": [nan, nan, nan], "js": [nan, nan, nan], "iou": [nan, nan, nan], "zero_reference_layers": 3},
    ]
    assert aggregate.layer_means(records, "ar") == [2.0, 3.0, 5.0]  # by hand: (1+3)/2, (2+4)/2, 5 alone
    assert aggregate.best_layer(records) == {"layer": 1, "ar": 3.0, "kl": 0.2, "js": 0.3}
    assert aggregate.counts(records)["zero_reference_layers"] == 4
    assert aggregate.layer_means(records[2:], "kl") == [None, None, None]
