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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import engine, settings
from .passes import Steering, generate_new_tokens


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


def config_from_args(method: str, args: dict) -> PaiConfig | AdaptVisConfig:
    """A method's settings from ``--model_args`` values (strings or numbers), checked; unknown names are an error."""
    known = {"pai": PaiConfig, "adaptvis": AdaptVisConfig}
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


def image_steer(batch: dict, image_token_id: int, layers, kind: str, values, prefill_only: bool) -> engine.Steer:
    """A steer on the image tokens of an encoded batch, one value per sample."""
    cols = (batch["input_ids"] == image_token_id).cpu()
    return engine.Steer(frozenset(layers), cols, kind, torch.as_tensor(values, dtype=torch.float32).reshape(cols.shape[0]), prefill_only)


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
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.mask, self.cache = mask, out.past_key_values
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
    steer = image_steer(batch, adapter.image_token_id, range(config.start_layer, n_layers), "amplify", [config.alpha] * len(texts), False)
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
    steer = image_steer(batch, adapter.image_token_id, range(model.config.text_config.num_hidden_layers), "scale", weights, True)
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
        layers = frozenset(range(config.start_layer, n_layers))
        return lambda images, texts: Steering("amplify", layers, torch.full((len(texts),), config.alpha), False)

    def adaptvis(images, texts) -> Steering:
        _, weights = adaptvis_weights(adapter, adapter.encode(images, texts), config)
        return Steering("scale", frozenset(range(n_layers)), weights, True)

    return adaptvis
