"""LLaVA's S2 multi-scale CLIP tower (``CLIPVisionTowerS2``, LLaVA-Tri) on transformers' LLaVA classes.

As the S2 wrapper (``s2wrapper.forward``, split mode ``resize``) computes it: the processor resizes the
image to the largest scale; for each scale the image is resized (bicubic) to it, cut into tiles of the
smallest scale, each tile runs through the CLIP tower (layer ``vision_feature_layer``, CLS dropped), the
tiles' feature maps are put back together, and every scale's map is area-resized to the smallest
scale's grid; the maps are concatenated along channels (``hidden x scales``) before the projector. The
text decoder is transformers' own, so it dispatches through ``AttentionInterface``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel

from .architectures import InnerModelSwap, register

DEFAULT_SCALES = (336, 672, 1008)  # CLIPVisionTowerS2's default s2_scales


def scales_of(original_config: dict) -> tuple[int, ...]:
    """The S2 scales an original LLaVA config asks for (``s2: true``, ``s2_scales: "336,672,1008"``), or () without S2."""
    if not original_config.get("s2"):
        return ()
    value = original_config.get("s2_scales", ",".join(map(str, DEFAULT_SCALES)))
    return tuple(sorted(int(x) for x in str(value).split(",")))


class LlavaS2Config(LlavaConfig):
    model_type = "llava_s2"

    def __init__(self, s2_scales=DEFAULT_SCALES, **kwargs):
        self.s2_scales = sorted(int(x) for x in s2_scales)
        super().__init__(**kwargs)


def multiscale_features(tower, images: torch.Tensor, scales, layer: int, drop_cls: bool) -> torch.Tensor:
    """``[B, grid^2, hidden * len(scales)]`` features of ``images`` ``[B, C, S, S]`` (S = the largest scale)."""
    batch, split = images.shape[0], min(scales)
    maps = []
    for size in scales:
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic").to(images.dtype)
        n = math.ceil(size / split)
        if n * split != size:  # the wrapper resizes to a whole number of tiles, and the features back
            x = F.interpolate(x.float(), size=(n * split, n * split), mode="bicubic").to(x.dtype)
        tiles = torch.cat([x[:, :, i * split : (i + 1) * split, j * split : (j + 1) * split] for i in range(n) for j in range(n)])
        hidden = tower(tiles, output_hidden_states=True).hidden_states[layer]
        hidden = hidden[:, 1:] if drop_cls else hidden
        side = int(hidden.shape[1] ** 0.5)
        grid = hidden.transpose(1, 2).reshape(hidden.shape[0], -1, side, side)  # b (h w) c -> b c h w
        rows = [torch.cat([grid[(i * n + j) * batch : (i * n + j + 1) * batch] for j in range(n)], dim=-1) for i in range(n)]
        merged = torch.cat(rows, dim=-2)
        if n * split != size:
            feature = math.ceil(size / (n * split) * merged.shape[-1])
            merged = F.interpolate(merged.float(), size=(feature, feature), mode="area").to(merged.dtype)
        maps.append(merged)
    target = maps[0].shape[-2:]
    out = torch.cat([F.interpolate(m.float(), size=target, mode="area").to(m.dtype) for m in maps], dim=1)
    return out.flatten(2).transpose(1, 2)


class LlavaS2Model(LlavaModel):
    config_class = LlavaS2Config

    def __init__(self, config: LlavaS2Config):
        super().__init__(config)
        width = config.vision_config.hidden_size * len(config.s2_scales)  # the scales' features side by side
        self.multi_modal_projector.linear_1 = nn.Linear(width, config.text_config.hidden_size, bias=config.multimodal_projector_bias)

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise TypeError("S2 features come from one vision layer; vision_feature_layer must be an int")
        features = multiscale_features(self.vision_tower, pixel_values, self.config.s2_scales, layer, strategy == "default")
        return BaseModelOutputWithPooling(pooler_output=list(self.multi_modal_projector(features)))


class LlavaS2ForConditionalGeneration(InnerModelSwap, LlavaForConditionalGeneration):
    config_class = LlavaS2Config
    inner_model_class = LlavaS2Model


register(LlavaS2Config, LlavaS2ForConditionalGeneration, LlavaProcessor)
