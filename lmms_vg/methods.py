"""Training-free methods that steer a model's attention to the image, beside VGRefine (the paper's Table F.4).

Each runs on the attention engine of any supported model, as its public code does it:

- **PAI** (LALBJ/PAI): in layers ``start_layer`` .. last, the last query's pre-softmax logits to the
  image tokens become ``a + alpha |a|`` at every step (its ``llama_new_forward``), and the next-token
  log-probabilities are guided away from a text-only run of the same prompt:
  ``gamma (logp - logp_text) + logp_text``, tokens below ``0.1 x`` the top probability removed
  (its ``CFGLogits``). The text-only prompt is the prompt with its image placeholder removed.
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
from transformers import LogitsProcessor, LogitsProcessorList

from . import engine, internals, settings
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


@dataclass(frozen=True)
class AdaptVisConfig:
    """AdaptVis's settings: below ``threshold`` confidence the image logits are scaled by ``weight1``, else by ``weight2``.

    Its runs search weight1 in {0.5, 0.8} and weight2 in {1.2, 1.5, 2.0} per dataset, threshold 0.3.
    """

    threshold: float = 0.3
    weight1: float = 0.5
    weight2: float = 1.5

    def __post_init__(self):
        if not 0 <= self.threshold <= 1 or self.weight1 <= 0 or self.weight2 <= 0:
            raise MethodConfigError(f"AdaptVis settings out of range: {self}; threshold in [0, 1], weights > 0")


@dataclass(frozen=True)
class ViCropConfig:
    """ViCrop's settings: the attention ``layer`` and the crop's base size ``bbox_size`` (0: the model's defaults).

    Defaults as its code: layer 14 and the 336-px input size for LLaVA-1.5-style models, layer 22 and
    224 px for the Qwen2-VL family.
    """

    layer: int = 0
    bbox_size: int = 0

    def __post_init__(self):
        if self.layer < 0 or self.bbox_size < 0:
            raise MethodConfigError(f"ViCrop settings out of range: {self}; layer and bbox_size are >= 0 (0: the model's default)")

    def resolved(self, adapter) -> tuple[int, int]:
        from .adapters import Qwen2VLAdapter

        qwen = isinstance(adapter, Qwen2VLAdapter)  # its published settings for Qwen2.5-VL
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
    parse = {int: settings.as_int, float: settings.as_float}
    values = {k: parse[type(fields[k].default)](k, v) for k, v in args.items() if v is not None}
    return cls(**values)


def pai_steering(config: PaiConfig, n_layers: int, batch_size: int) -> Steering:
    """PAI's steer: image attention amplified by ``alpha`` from ``start_layer`` on, at every step."""
    return Steering("amplify", frozenset(range(config.start_layer, n_layers)), torch.full((batch_size,), config.alpha), False)


def adaptvis_steering(weights: torch.Tensor, n_layers: int) -> Steering:
    """AdaptVis's steer: image attention scaled by each sample's weight at every layer, prompt only."""
    return Steering("scale", frozenset(range(n_layers)), weights, True)


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
    if config.start_layer >= n_layers:
        raise MethodConfigError(f"PAI start_layer={config.start_layer} but {adapter.name} has {n_layers} text layers")
    batch = adapter.encode(images, texts)
    steer = image_steer(batch, adapter.image_token_id, pai_steering(config, n_layers, len(texts)))
    if config.gamma != 1:
        text_only = adapter.tokenizer([adapter.text_only_prompt(t) for t in texts], return_tensors="pt", padding=True).to(adapter.device)
        processors = LogitsProcessorList([TextGuidance(model, dict(text_only), config.gamma, config.cutoff)])
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

    PAI steers every pass's last row at its layers; AdaptVis needs each question's confidence first
    (one plain pass of the questions), and steers with the weight it picks, question and generic prompt alike.
    """
    n_layers = adapter.model.config.text_config.num_hidden_layers
    if method == "pai":
        return lambda images, texts: pai_steering(config, n_layers, len(texts))

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


def vicrop_generate(adapter, images, texts, config: ViCropConfig, **generate_kwargs) -> MethodOutcome:
    """ViCrop answers for a batch (one image per prompt): the relative-attention crop, then the original and the crop together."""
    layer, bbox_size = config.resolved(adapter)
    passes, relative = Passes(adapter, reference_cache_size=0), [None] * len(images)
    for members in same_grid(adapter, images):
        batch = passes.batch([images[i] for i in members], [texts[i] for i in members])
        question, reference = batch.question_and_reference(GENERIC_PROMPT + SHORT_ANSWER, frozenset({layer}))
        for i, ratio in zip(members, (question[:, layer].mean(1) / reference[:, layer].mean(1)).cpu()):
            relative[i] = ratio  # [N]: no epsilon, as its code
    order = adapter.cell_order
    crops, boxes = [], []
    for image, ratio in zip(images, relative):
        t = adapter.transform(image)
        grid = (ratio[order] if order is not None else ratio).reshape(t.rows, t.cols).numpy()
        box = vicrop_box(grid, image.size, bbox_size)
        boxes.append([round(float(v), 2) for v in box])
        crops.append(image.crop(box))
    encoded = adapter.encode([[image, crop] for image, crop in zip(images, crops)], texts)
    tokens, first = generate_new_tokens(adapter.model, encoded, **generate_kwargs)
    return MethodOutcome(tokens, first, [{"vicrop_box": box, "vicrop_layer": layer} for box in boxes])
