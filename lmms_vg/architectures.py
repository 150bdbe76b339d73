"""What lmms-vg's own architectures (S2 LLaVA, VILA, InternVL v1 shuffle) share: a transformers class with its inner model
swapped, registered with the Auto classes so that ``from_pretrained`` finds it by the config's ``model_type``."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor


class InnerModelSwap:
    """Mixin before a transformers ``...ForConditionalGeneration``: its ``self.model`` is ``inner_model_class(config)``."""

    inner_model_class: type

    def __init__(self, config):
        super().__init__(config)
        self.model = self.inner_model_class(config)
        self.post_init()


def register(config_class, model_class, processor_class=None) -> None:
    """Make the Auto classes load ``model_class`` (and ``processor_class``) for ``config_class.model_type`` (idempotent)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    if processor_class is not None:
        AutoProcessor.register(config_class, processor_class, exist_ok=True)
