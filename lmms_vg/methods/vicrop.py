"""ViCrop (saccharomycetes/mllms_know @ a64c5d5, ``rel_att``): crop where the model looks, answer from the image and the crop.

The last token's head-averaged attention to the image at one layer (LLaVA-1.5: 14, Qwen2.5-VL: 22),
divided by the generic prompt's; its adaptive sliding-window search (:func:`vicrop_box`) picks a
crop; the answer comes from the original image and the crop together. Its attention passes ask the
short question with " Answer the question using a single word or phrase." (run.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from ..passes import Passes, generate_new_tokens, same_grid
from ..prompts import GENERIC_PROMPT, SHORT_ANSWER
from .base import Asked, Method, MethodConfigError, MethodOutcome, register


@dataclass(frozen=True)
class ViCropConfig:
    """ViCrop's settings: the attention ``layer`` and the crop's base size ``bbox_size`` (0: the model's defaults).

    Defaults as its code (saccharomycetes/mllms_know @ a64c5d5, run.py): layer 14 and the 336-px input
    size for LLaVA-1.5-style models, layer 22 and 224 px for the Qwen2-VL family. ``high_res``: its
    ``rel_att_high`` (utils.py ``high_res``): the image cut into blocks of at most 1024 px, a map per
    block, the maps joined; its code has it for fixed-grid models only, and so does this.
    """

    layer: int = 0
    bbox_size: int = 0
    high_res: bool = False

    def __post_init__(self):
        if self.layer < 0 or self.bbox_size < 0:
            raise MethodConfigError(f"ViCrop settings out of range: {self}; layer and bbox_size are >= 0 (0: the model's default)")

    def check(self, adapter) -> None:
        """Against the loaded model, before any sample: the layer exists, the crop search suits the family."""
        self.resolved(adapter)

    def resolved(self, adapter) -> tuple[int, int]:
        """(layer, crop size) for this model: the settings given, else its family's published defaults."""
        if self.high_res and not adapter.fixed_grid:
            raise MethodConfigError(f"ViCrop high_res=true: its code tiles fixed-grid models only (LLaVA, BLIP), not {adapter.name}")
        default_layer, default_size = adapter.vicrop_defaults
        layer = self.layer or default_layer
        n_layers = adapter.model.config.text_config.num_hidden_layers
        if layer >= n_layers:
            raise MethodConfigError(f"ViCrop layer={layer} but {adapter.name} has {n_layers} text layers; give layer= in --model_args")
        size = self.bbox_size or default_size or int(getattr(adapter, "size", 0) or adapter.processor.image_processor.crop_size["height"])
        return layer, size


def vicrop_box(att_map, image_size: tuple[int, int], bbox_size: int = 336) -> tuple[float, float, float, float]:
    """ViCrop's ``bbox_from_att_image_adaptive``, step for step: a crop of ``bbox_size x r`` (r in 1 .. 2) around the
    window of most attention, the ratio whose window stands out most from its neighbours (x1, y1, x2, y2 in pixels)."""
    import numpy as np

    ratios = [1, 1.2, 1.4, 1.6, 1.8, 2]
    rows, cols = att_map.shape
    block_size = image_size[0] / cols, image_size[1] / rows
    positions, differences, block_nums = [], [], []
    for ratio in ratios:
        block_num = min(int(bbox_size * ratio / block_size[0]), cols), min(int(bbox_size * ratio / block_size[1]), rows)
        if cols - block_num[0] < 1 and rows - block_num[1] < 1:
            if ratio == 1:
                return 0, 0, image_size[0], image_size[1]
            continue
        block_nums.append(block_num)
        sliding = np.zeros((rows - block_num[1] + 1, cols - block_num[0] + 1))
        best, best_pos = -np.inf, (0, 0)
        for x in range(cols - block_num[0] + 1):  # column-major scan: the first maximum wins, as in its code
            for y in range(rows - block_num[1] + 1):
                sliding[y, x] = att_map[y : y + block_num[1], x : x + block_num[0]].sum()
                if sliding[y, x] > best:
                    best, best_pos = sliding[y, x], (x, y)
        x, y = best_pos
        neighbours = [sliding[y, x - 1]] if x > 0 else []
        neighbours += [sliding[y, x + 1]] if x < sliding.shape[1] - 1 else []
        neighbours += [sliding[y - 1, x]] if y > 0 else []
        neighbours += [sliding[y + 1, x]] if y < sliding.shape[0] - 1 else []
        differences.append((best - np.mean(neighbours)) / (block_num[0] * block_num[1]))
        positions.append(best_pos)
    pick = int(np.argmax(differences))
    (x, y), block_num = positions[pick], block_nums[pick]
    size = bbox_size * ratios[pick]  # its code indexes the ratios with the kept windows' index: the same when none was skipped
    x_center = int(x * block_size[0] + block_size[0] * block_num[0] / 2)
    y_center = int(y * block_size[1] + block_size[1] * block_num[1] / 2)
    x_center = min(max(x_center, size // 2), image_size[0] - size // 2)
    y_center = min(max(y_center, size // 2), image_size[1] - size // 2)
    return (
        max(0, x_center - size // 2),
        max(0, y_center - size // 2),
        min(image_size[0], x_center + size // 2),
        min(image_size[1], y_center + size // 2),
    )


def high_res_blocks(image: Image.Image, limit: int = 1024) -> tuple[list[Image.Image], int, int]:
    """ViCrop's ``high_res_split_threshold``: the image cut into a grid of blocks (row-major), rows and columns of it.

    Its column count ``int(rows * width / height)`` is 0 for an image taller than ``rows`` times its
    width, where its code divides by zero; here that image is one column.
    """
    rows = math.ceil(image.height / limit)
    cols = max(1, int(rows * image.width / image.height))
    size = math.ceil(image.width / cols), math.ceil(image.height / rows)
    blocks = [image.crop((i * size[0], j * size[1], (i + 1) * size[0], (j + 1) * size[1])) for j in range(rows) for i in range(cols)]
    return blocks, rows, cols


def relative_attention(adapter, images, texts, layer: int) -> list:
    """ViCrop's ``rel_att`` map of each image, a ``[rows, cols]`` grid: the question's last-token attention at ``layer``,
    heads averaged, divided by the generic prompt's (no epsilon, as its code)."""
    import numpy as np

    passes, maps = Passes(adapter), [None] * len(images)  # no image keys: nothing cached
    for members in same_grid(adapter, images):
        batch = passes.batch([images[i] for i in members], [texts[i] for i in members])
        question, reference = batch.question_and_reference(GENERIC_PROMPT + SHORT_ANSWER, frozenset({layer}))
        for i, ratio in zip(members, (question[:, layer].mean(1) / reference[:, layer].mean(1)).cpu()):
            t, order = adapter.transform(images[i]), adapter.cell_order
            maps[i] = np.asarray((ratio[order] if order is not None else ratio).reshape(t.rows, t.cols))
    return maps


def vicrop_generate(adapter, images, texts, config: ViCropConfig, attention_texts=None, **generate_kwargs) -> MethodOutcome:
    """ViCrop answers for a batch (one image per prompt): the relative-attention crop, then the original and the crop together.

    The attention passes use ``attention_texts`` (its run.py: the short question + " Answer the question using a
    single word or phrase."; default: ``texts``); the answer comes from ``texts`` with the image and its crop.
    """
    import numpy as np

    layer, bbox_size = config.resolved(adapter)
    asked = list(attention_texts or texts)
    if config.high_res:
        split = [high_res_blocks(image) for image in images]
        flat = relative_attention(
            adapter, [b for blocks, _, _ in split for b in blocks], [q for q, (b, _, _) in zip(asked, split) for _ in b], layer
        )
        maps, at = [], 0
        for blocks, rows, cols in split:
            tiles = flat[at : at + len(blocks)]
            maps.append(np.block([tiles[r * cols : (r + 1) * cols] for r in range(rows)]))
            at += len(blocks)
    else:
        maps = relative_attention(adapter, images, asked, layer)
    boxes = [vicrop_box(grid, image.size, bbox_size) for grid, image in zip(maps, images)]
    crops = [image.crop(box) for image, box in zip(images, boxes)]
    encoded = adapter.encode([[image, crop] for image, crop in zip(images, crops)], texts)
    tokens, first = generate_new_tokens(adapter.model, encoded, **generate_kwargs)
    # the box is in whole pixels (the search centres on ints and halves sizes with //): logged as is
    details = [{"vicrop_box": [float(v) for v in box], "vicrop_layer": layer, "vicrop_attention_prompt": q} for box, q in zip(boxes, asked)]
    return MethodOutcome(tokens, first, details)


@register
class ViCrop(Method):
    """Its grounding is the model's own: it changes the input, not the attention."""

    name, label, Settings = "vicrop", "ViCrop", ViCropConfig
    one_image = True

    def answer(self, asked: Asked, **generate_kwargs) -> MethodOutcome:
        images = [imgs[0] for imgs in asked.images]
        return vicrop_generate(self.adapter, images, asked.texts, self.settings, attention_texts=asked.short_questions, **generate_kwargs)

    def not_applied(self, n_images: int) -> dict:
        return {"method": {"name": self.name, "applied": f"no: {n_images} images (ViCrop crops one)"}}
