"""Inference-time methods on the attention engine, one module each behind one interface (:class:`base.Method`).

- :mod:`.vgrefine`: the paper's VGRefine (attention triage with calibrated heads, then knockout);
- :mod:`.pai`, :mod:`.adaptvis`, :mod:`.vicrop`: the methods the paper compares with (its Table F.4),
  each as its public code runs it.

Adding a method is one module that subclasses :class:`Method`, registers it (``@register``) and is
imported here; its name in :data:`lmms_vg.presets.METHODS` gives every model id a twin that runs it.
"""

from . import adaptvis, pai, vgrefine, vicrop
from .adaptvis import AdaptVisConfig, adaptvis_generate, adaptvis_steering, adaptvis_weights
from .base import METHODS, Asked, GroundingPlan, KnockoutPlan, Method, MethodConfigError, MethodOutcome, Steering, image_steer, register
from .pai import PaiConfig, TextGuidance, pai_generate, pai_steering
from .vicrop import ViCropConfig, high_res_blocks, relative_attention, vicrop_box, vicrop_generate


def config_from_args(method: str, args: dict):
    """A method's settings from ``--model_args`` values (strings or numbers), checked; unknown names are an error."""
    cls = METHODS.get(method)
    if cls is None or method == "vgrefine":
        raise MethodConfigError(f"unknown method {method!r}: one of {sorted(set(METHODS) - {'vgrefine'})} (VGRefine has its own settings)")
    return cls.settings_from_args(args, {})


def steering(method: str, config, adapter):
    """The method's grounding steer (``(images, texts) -> Steering``), or None where its grounding is the model's own."""
    return METHODS[method](adapter, config).grounding().steering


__all__ = [
    "METHODS",
    "AdaptVisConfig",
    "Asked",
    "GroundingPlan",
    "KnockoutPlan",
    "Method",
    "MethodConfigError",
    "MethodOutcome",
    "PaiConfig",
    "Steering",
    "TextGuidance",
    "ViCropConfig",
    "adaptvis",
    "adaptvis_generate",
    "adaptvis_steering",
    "adaptvis_weights",
    "config_from_args",
    "high_res_blocks",
    "image_steer",
    "pai",
    "pai_generate",
    "pai_steering",
    "register",
    "relative_attention",
    "steering",
    "vgrefine",
    "vicrop",
    "vicrop_box",
    "vicrop_generate",
]
