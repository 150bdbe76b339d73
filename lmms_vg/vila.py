"""VILA (VILA1.5, VILA-M3) on transformers' parts: its SigLIP tower, its ``mlp_downsample`` projector, a Llama text model.

As the VILA codebase computes it: SigLIP's hidden states at ``mm_vision_select_layer`` (every token:
SigLIP has no CLS), then ``DownSampleBlock``: the ``g x g`` patch grid (zero-padded to even) folded
2 x 2 into one token of 4x the width, then LayerNorm, Linear, GELU, Linear. VILA's fold leaves the
tokens in **column-major** order (its ``flat_square`` swaps the axes once and not back):
:func:`cell_order` maps them to row-major cells for the grounding metrics. The text decoder is
transformers' own, so it dispatches through ``AttentionInterface``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel

from .architectures import InnerModelSwap, register

MERGE = 2  # DownSampleBlock folds 2 x 2 patches


class VilaConfig(LlavaConfig):
    model_type = "llava_vila"


def fold(features: torch.Tensor) -> torch.Tensor:
    """``[B, g*g, C]`` (row-major patches) -> ``[B, (ceil(g/2))^2, 4C]`` in VILA's token order.

    Token ``t`` is the 2 x 2 block at block-row ``t % side``, block-column ``t // side``; its channels
    are the block's patches (row 0 col 0, row 0 col 1, row 1 col 0, row 1 col 1). Odd grids get a row
    and a column of zeros, as VILA pads them.
    """
    b, n, c = features.shape
    g = math.isqrt(n)
    grid = features.reshape(b, g, g, c)
    if g % 2:
        grid = F.pad(grid, (0, 0, 0, 1, 0, 1))  # one more column, then one more row, of zeros
    side = grid.shape[1] // MERGE
    blocks = grid.reshape(b, side, MERGE, side, MERGE, c).permute(0, 3, 1, 2, 4, 5)  # [b, block-col, block-row, r, c, C]
    return blocks.reshape(b, side * side, MERGE * MERGE * c)


def cell_order(side: int) -> list[int]:
    """For each row-major cell, the index of its token in VILA's column-major order."""
    return [col * side + row for row in range(side) for col in range(side)]


class DownsampleProjector(nn.Module):
    """VILA's ``mlp_downsample`` after the fold: LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H)."""

    def __init__(self, config: VilaConfig):
        super().__init__()
        width, hidden = config.vision_config.hidden_size * MERGE * MERGE, config.text_config.hidden_size
        self.norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, folded: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(folded))))


class VilaModel(LlavaModel):
    config_class = VilaConfig

    def __init__(self, config: VilaConfig):
        super().__init__(config)
        self.multi_modal_projector = DownsampleProjector(config)

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        hidden = hidden[:, 1:] if strategy == "default" else hidden
        return BaseModelOutputWithPooling(pooler_output=list(self.multi_modal_projector(fold(hidden))))


class VilaForConditionalGeneration(InnerModelSwap, LlavaForConditionalGeneration):
    config_class = VilaConfig
    inner_model_class = VilaModel


register(VilaConfig, VilaForConditionalGeneration)
