"""AdaptVis (shiqichen17/AdaptVis @ 3b41399): image attention scaled by a weight its own confidence picks.

A plain pass gives the confidence (the first token's top probability, rounded to 2 places); then
generation with the last query's logits to the image tokens multiplied by ``weight1`` (confidence
below ``threshold``) or ``weight2``, in every layer, in the prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import engine
from ..passes import generate_new_tokens
from .base import Asked, GroundingPlan, Method, MethodConfigError, MethodOutcome, Steering, image_steer, register


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


def adaptvis_steering(weights: torch.Tensor, n_layers: int) -> Steering:
    """AdaptVis's steer: image attention scaled by each sample's weight at every layer, prompt only."""
    return Steering("scale", frozenset(range(n_layers)), weights, "prefill")


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


@register
class AdaptVis(Method):
    name, label, Settings = "adaptvis", "AdaptVis", AdaptVisConfig

    def answer(self, asked: Asked, **generate_kwargs) -> MethodOutcome:
        return adaptvis_generate(self.adapter, asked.images, asked.texts, self.settings, **generate_kwargs)

    def grounding(self) -> GroundingPlan:
        """Each question's confidence picks its weight (one plain pass of the questions); question and generic prompt
        are steered with it alike."""
        n_layers = self.adapter.model.config.text_config.num_hidden_layers

        def steering(images, texts) -> Steering:
            _, weights = adaptvis_weights(self.adapter, self.adapter.encode(images, texts), self.settings)
            return adaptvis_steering(weights, n_layers)

        return GroundingPlan(steering=steering)
