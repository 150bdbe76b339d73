"""Training-free methods that steer a model's attention to the image, beside VGRefine (the paper's Table F.4).

Each runs on the attention engine of any supported model, as its public code does it:

- **PAI** (LALBJ/PAI @ 9bbd8bd): in layers ``start_layer`` .. last, the last query's pre-softmax logits
  to the image tokens become ``a + alpha |a|`` (its ``llama_new_forward``), and the next-token
  log-probabilities are guided away from a text-only run of the same prompt:
  ``gamma (logp - logp_text) + logp_text``, tokens below ``0.1 x`` the top probability removed
  (its ``CFGLogits``). With guidance on, the edit is off in the first forward (``llama_modify(...,
  use_cfg)`` and ``if use_attn and not use_cfg`` in attention.py) and ``CFGLogits`` switches it on
  after its first call (CFG.py): the first token comes from unedited logits plus guidance, the edit
  acts from the second on. ``gamma=1`` is PAI without guidance (its runs without ``--use-cfg``): the
  edit acts at every step, the first included. The text-only prompt is the text before the image and
  the text after it, tokenised apart (its ``init_cfg_processor``).
- **AdaptVis** (shiqichen17/AdaptVis): a plain pass gives the confidence (the first token's top
  probability, rounded to 2 places); then generation with the last query's logits to the image
  tokens multiplied by ``weight1`` (confidence below ``threshold``) or ``weight2``, in every layer,
  in the prefill only.
- **ViCrop** (saccharomycetes/mllms_know, ``rel_att``): the last token's head-averaged attention to
  the image at one layer (LLaVA-1.5: 14, Qwen2.5-VL: 22), divided by the generic prompt's; its
  adaptive sliding-window search (:func:`vicrop_box`) picks a crop; the answer comes from the
  original image and the crop together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from . import engine, internals, settings
from .adapters import left_padded
from .passes import Passes, Steering, generate_new_tokens, same_grid
from .prompts import GENERIC_PROMPT, SHORT_ANSWER


class MethodConfigError(ValueError):
    """A method setting that cannot work; raised before any sample runs."""


@dataclass(frozen=True)
class PaiConfig:
    """PAI's settings: ``alpha`` (its example 0.2), ``gamma`` (its CFG processor's default 1.1; 1 = no guidance), ``start_layer`` 2."""

    alpha: float = 0.2
    gamma: float = 1.1
    start_layer: int = 2
    cutoff: float = 0.1  # CFGLogits: tokens below cutoff x the top probability are removed

    def __post_init__(self):
        if self.alpha < 0 or self.gamma < 0 or self.start_layer < 0 or not 0 < self.cutoff <= 1:
            raise MethodConfigError(f"PAI settings out of range: {self}; alpha, gamma and start_layer are >= 0, cutoff in (0, 1]")

    @property
    def guided(self) -> bool:
        """Guidance on (its ``--use-cfg``): gamma other than 1."""
        return self.gamma != 1

    def check(self, adapter) -> None:
        """Against the loaded model, before any sample."""
        n_layers = adapter.model.config.text_config.num_hidden_layers
        if self.start_layer >= n_layers:
            raise MethodConfigError(f"PAI start_layer={self.start_layer} but {adapter.name} has {n_layers} text layers (0..{n_layers - 1})")


@dataclass(frozen=True)
class AdaptVisConfig:
    """AdaptVis's settings: below ``threshold`` confidence the image logits are scaled by ``weight1``, else by ``weight2``.

    Defaults as its run script (shiqichen17/AdaptVis @ 3b41399, run.sh: ``--weight1 0.5 --weight2 1.5
    --threshold 0.4``), the setting behind its published numbers (its README's example says 0.3). Its
    runs search weight1 in {0.5, 0.8} and weight2 in {1.2, 1.5, 2.0} per dataset.
    """

    threshold: float = 0.4
    weight1: float = 0.5
    weight2: float = 1.5

    def __post_init__(self):
        if not 0 <= self.threshold <= 1 or self.weight1 <= 0 or self.weight2 <= 0:
            raise MethodConfigError(f"AdaptVis settings out of range: {self}; threshold in [0, 1], weights > 0")

    def check(self, adapter) -> None:
        """Every layer is steered: nothing to check against the model."""


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
        from .adapters import Qwen2VLAdapter

        qwen = isinstance(adapter, Qwen2VLAdapter)  # its published settings for Qwen2.5-VL
        if qwen and self.high_res:
            raise MethodConfigError(f"ViCrop high_res=true: its code tiles fixed-grid models only (LLaVA, BLIP), not {adapter.name}")
        layer = self.layer or (22 if qwen else 14)
        n_layers = adapter.model.config.text_config.num_hidden_layers
        if layer >= n_layers:
            raise MethodConfigError(f"ViCrop layer={layer} but {adapter.name} has {n_layers} text layers; give layer= in --model_args")
        return layer, self.bbox_size or (
            224 if qwen else int(getattr(adapter, "size", 0) or adapter.processor.image_processor.crop_size["height"])
        )


def config_from_args(method: str, args: dict) -> PaiConfig | AdaptVisConfig | ViCropConfig:
    """A method's settings from ``--model_args`` values (strings or numbers), checked; unknown names are an error."""
    known = {"pai": PaiConfig, "adaptvis": AdaptVisConfig, "vicrop": ViCropConfig}
    cls = known.get(method)
    if cls is None:
        raise MethodConfigError(f"unknown method {method!r}: one of {sorted(known)} (VGRefine has its own settings)")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise MethodConfigError(f"{method}: unknown settings {unknown}; it takes {sorted(fields)}")
    parse = {int: settings.as_int, float: settings.as_float, bool: settings.as_bool}
    values = {k: parse[type(fields[k].default)](k, v) for k, v in args.items() if v is not None}
    return cls(**values)


def pai_steering(config: PaiConfig, n_layers: int, batch_size: int) -> Steering:
    """PAI's steer: image attention amplified by ``alpha`` from ``start_layer`` on; with guidance, from the second token on."""
    steps = "decode" if config.guided else "all"
    return Steering("amplify", frozenset(range(config.start_layer, n_layers)), torch.full((batch_size,), config.alpha), steps)


def adaptvis_steering(weights: torch.Tensor, n_layers: int) -> Steering:
    """AdaptVis's steer: image attention scaled by each sample's weight at every layer, prompt only."""
    return Steering("scale", frozenset(range(n_layers)), weights, "prefill")


def image_steer(batch: dict, image_token_id: int, steering: Steering) -> engine.Steer:
    """The steer on the image tokens of an encoded batch."""
    return steering.plan((batch["input_ids"] == image_token_id).cpu())


class TextGuidance(LogitsProcessor):
    """PAI's CFGLogits: log-probabilities guided away from a text-only run of the prompt, which advances with the answer.

    The text-only run is unsteered (PAI switches its attention edit off for it) and cached; its
    positions follow its own left padding.
    """

    def __init__(self, model, text_only: dict, gamma: float, cutoff: float = 0.1):
        self.model, self.gamma, self.log_cutoff = model, gamma, math.log(cutoff)
        self.ids, self.mask = text_only["input_ids"], text_only["attention_mask"]
        self.cache = None

    def _text_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            ids, mask = self.ids, self.mask
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
        else:
            ids, mask = input_ids[:, -1:], torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
        with torch.no_grad(), engine.arm(self.model):  # an empty arm: nothing steered in this run
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **internals.cache_arg(self.model, self.cache), use_cache=True
            )
        self.mask, self.cache = mask, internals.output_cache(out)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.log_softmax(scores.float(), dim=-1)
        if self.gamma == 1:
            return scores
        text = self._text_logprobs(input_ids)
        guided = self.gamma * (scores - text) + text
        return guided.masked_fill(scores < self.log_cutoff + scores.max(dim=-1, keepdim=True).values, float("-inf"))


@dataclass
class MethodOutcome:
    tokens: torch.Tensor  # [B, new]
    first_logits: torch.Tensor | None  # [B, vocab] with output_logits=True (PAI: after guidance)
    details: list[dict]  # per sample: what the method did (AdaptVis: confidence and weight)


def pai_generate(adapter, images, texts, config: PaiConfig, **generate_kwargs) -> MethodOutcome:
    """PAI answers for a batch (one image per prompt)."""
    model = adapter.model
    n_layers = model.config.text_config.num_hidden_layers
    config.check(adapter)
    batch = adapter.encode(images, texts)
    steer = image_steer(batch, adapter.image_token_id, pai_steering(config, n_layers, len(texts)))
    if config.guided:
        text_only = left_padded([adapter.text_only_ids(t) for t in texts], adapter.tokenizer.pad_token_id, adapter.device)
        processors = LogitsProcessorList([TextGuidance(model, text_only, config.gamma, config.cutoff)])
        generate_kwargs = {**generate_kwargs, "logits_processor": processors}
    tokens, first = generate_new_tokens(model, batch, steer=steer, **generate_kwargs)
    return MethodOutcome(tokens, first, [{"pai_alpha": config.alpha, "pai_gamma": config.gamma} for _ in texts])


def adaptvis_weights(adapter, batch: dict, config: AdaptVisConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's confidence (a plain pass's top first-token probability, rounded to 2 places as its code does) and weight."""
    with torch.no_grad(), engine.arm(adapter.model):
        first = adapter.model(**batch, logits_to_keep=1).logits[:, -1].float()
    confidence = torch.round(torch.softmax(first, dim=-1).max(dim=-1).values * 100) / 100
    return confidence.cpu(), torch.where(confidence < config.threshold, config.weight1, config.weight2).cpu()


def adaptvis_generate(adapter, images, texts, config: AdaptVisConfig, **generate_kwargs) -> MethodOutcome:
    """AdaptVis answers for a batch: the confidence of a plain pass picks each sample's weight."""
    model = adapter.model
    batch = adapter.encode(images, texts)
    confidence, weights = adaptvis_weights(adapter, batch, config)
    steer = image_steer(batch, adapter.image_token_id, adaptvis_steering(weights, model.config.text_config.num_hidden_layers))
    tokens, logits = generate_new_tokens(model, batch, steer=steer, **generate_kwargs)
    details = [{"adaptvis_confidence": float(c), "adaptvis_weight": float(w)} for c, w in zip(confidence, weights)]
    return MethodOutcome(tokens, logits, details)


def steering(method: str, config: PaiConfig | AdaptVisConfig, adapter):
    """The method's steer for a batch of (image, question) pairs, for grounding under it: ``(images, texts) -> Steering``.

    PAI without guidance steers every pass's last row at its layers; with guidance (its README's setting)
    the prompt's pass is not edited (the edit starts with the second token), so its maps are the
    model's own and there is no steer (None). AdaptVis needs each question's confidence first (one
    plain pass of the questions), and steers with the weight it picks, question and generic prompt alike.
    """
    n_layers = adapter.model.config.text_config.num_hidden_layers
    if method == "pai":
        return None if config.guided else (lambda images, texts: pai_steering(config, n_layers, len(texts)))

    def adaptvis(images, texts) -> Steering:
        _, weights = adaptvis_weights(adapter, adapter.encode(images, texts), config)
        return adaptvis_steering(weights, n_layers)

    return adaptvis


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

    passes, maps = Passes(adapter, reference_cache_size=0), [None] * len(images)
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
    details = [
        {"vicrop_box": [round(float(v), 2) for v in box], "vicrop_layer": layer, "vicrop_attention_prompt": q}
        for box, q in zip(boxes, asked)
    ]
    return MethodOutcome(tokens, first, details)
