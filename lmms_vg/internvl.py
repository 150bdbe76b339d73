"""InternVL-Chat-V1-2 (MedRegA) on transformers' native InternVL classes.

transformers' ``InternVLForConditionalGeneration`` computes InternViT (RMSNorm, fused-then-split qkv
with q/k RMSNorm over the full width, layer scale), the pixel shuffle and ``mlp1`` as InternVL does,
with one difference: its pixel shuffle is InternVL's ``ps_version: v2``. V1-2 checkpoints (MedRegA)
were trained with ``v1``, which leaves the shuffled grid transposed: the same tokens in column-major
order, as VILA's fold (``lmms_vg.vila``). :class:`InternVLPs1ForConditionalGeneration` keeps that order;
the adapter's ``cell_order`` maps the maps back to row-major cells for the grounding metrics.
"""

from __future__ import annotations

from transformers import InternVLConfig
from transformers.models.internvl.modeling_internvl import InternVLForConditionalGeneration, InternVLModel

from .architectures import InnerModelSwap, register


class InternVLPs1Config(InternVLConfig):
    model_type = "internvl_ps1"


class InternVLPs1Model(InternVLModel):
    config_class = InternVLPs1Config

    def pixel_shuffle(self, vision_features, scale_factor: float = 0.5):
        """InternVL's ``ps_version: v1``: v2 without its last swap of the two spatial axes."""
        return super().pixel_shuffle(vision_features, scale_factor).permute(0, 2, 1, 3)


class InternVLPs1ForConditionalGeneration(InnerModelSwap, InternVLForConditionalGeneration):
    config_class = InternVLPs1Config
    inner_model_class = InternVLPs1Model


register(InternVLPs1Config, InternVLPs1ForConditionalGeneration)
