"""PAI (LALBJ/PAI @ 9bbd8bd): image attention amplified, and the answer guided away from a text-only run.

In layers ``start_layer`` .. last, the last query's pre-softmax logits to the image tokens become
``a + alpha |a|`` (its ``llama_new_forward``), and the next-token log-probabilities are guided away
from a text-only run of the same prompt: ``gamma (logp - logp_text) + logp_text``, tokens below
``0.1 x`` the top probability removed (its ``CFGLogits``). With guidance on, the edit is off in the
first forward (``llama_modify(..., use_cfg)`` and ``if use_attn and not use_cfg`` in attention.py)
and ``CFGLogits`` switches it on after its first call (CFG.py): the first token comes from unedited
logits plus guidance, the edit acts from the second on. ``gamma=1`` is PAI without guidance (its runs
without ``--use-cfg``): the edit acts at every step, the first included. The text-only prompt is the
text before the image and the text after it, tokenised apart (its ``init_cfg_processor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .. import engine, internals
from ..adapters import left_padded
from ..passes import generate_new_tokens
from .base import Asked, GroundingPlan, Method, MethodConfigError, MethodOutcome, Steering, image_steer, register


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


def pai_steering(config: PaiConfig, n_layers: int, batch_size: int) -> Steering:
    """PAI's steer: image attention amplified by ``alpha`` from ``start_layer`` on; with guidance, from the second token on."""
    steps = "decode" if config.guided else "all"
    return Steering("amplify", frozenset(range(config.start_layer, n_layers)), torch.full((batch_size,), config.alpha), steps)


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


@register
class Pai(Method):
    name, label, Settings = "pai", "PAI", PaiConfig

    def answer(self, asked: Asked, **generate_kwargs) -> MethodOutcome:
        return pai_generate(self.adapter, asked.images, asked.texts, self.settings, **generate_kwargs)

    def grounding(self) -> GroundingPlan:
        """Without guidance the edit acts in the prompt's pass, so its maps are steered; with it, they are the model's own."""
        if self.settings.guided:
            return GroundingPlan()
        n_layers = self.adapter.model.config.text_config.num_hidden_layers
        return GroundingPlan(steering=lambda images, texts: pai_steering(self.settings, n_layers, len(texts)))
