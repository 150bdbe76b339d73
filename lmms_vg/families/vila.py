"""The VILA family (VILA1.5, VILA-M3 8B and 13B), whole in one module.

- **Port**: VILA on transformers' parts: its SigLIP tower, its ``mlp_downsample`` projector, a Llama
  text model. As the VILA codebase computes it: SigLIP's hidden states at ``mm_vision_select_layer``
  (every token: SigLIP has no CLS), then ``DownSampleBlock``: the ``g x g`` patch grid (zero-padded to
  even) folded 2 x 2 into one token of 4x the width, then LayerNorm, Linear, GELU, Linear. VILA's fold
  leaves the tokens in **column-major** order (its ``flat_square`` swaps the axes once and not back):
  :func:`cell_order` maps them to row-major cells for the grounding metrics.
- **Adapter** (:class:`VilaAdapter`): images resized to the tower's size whatever their shape; VILA's
  ``tokenizer_image_token``.
- **Converter** (:func:`convert_vila`): VILA's layout (``llm/``, ``vision_tower/``, ``mm_projector/``).
- **Templates** and **presets**: as MONAI's VLM-Radiology-Agent-Framework runs them (llama_3 for 8B, v1 for 13B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LlavaConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel

from .. import convert as conversion
from .. import geometry
from ..adapters import prepare_image
from ..architectures import InnerModelSwap, register
from ..convert import ConversionError, Converter, load_weights, make_room_for, map_key, register_converter
from ..presets import Family, ModelPreset, register_family, register_preset
from ..prompts import VICUNA_V1_TEMPLATE
from .llava import LlavaAdapter, vision_feature_fields

# VILA's ``llama_3`` conversation (SeparatorStyle.LLAMA_3): VILA-M3-8B's (MONAI's m3-vila8b.sh --version llama_3)
VILA_LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)


# ---------------------------------------------------------------- the port
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


# ---------------------------------------------------------------- the adapter
class VilaAdapter(LlavaAdapter):
    """VILA (VILA1.5, VILA-M3): a SigLIP tower at a fixed size, 2 x 2 patches folded into one token.

    Images are resized to the tower's size whatever their shape (VILA's ``image_aspect_ratio:
    resize``), or padded to square first where the preset says so. The checkpoint carries a tokenizer
    and SigLIP's image processor, no LLaVA processor: each ``<image>`` is expanded here to the folded
    grid's token count. VILA's fold orders tokens column-major; ``cell_order`` puts the maps in row-major
    cells for the grounding metrics (VGRefine works in token order and needs no reordering).
    """

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="llava"):
        super().__init__(model, processor, chat_template, name, pad_to_square=bool(pad_to_square), tokenisation=tokenisation)
        ip = self.processor.image_processor
        self.size = int(ip.size["height"])
        patch = model.config.vision_config.patch_size
        self.patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self.side = -(-(self.size // self.patch) // MERGE)
        self.merge = MERGE
        self.cell_order = cell_order(self.side)

    def model_image(self, image: Image.Image) -> Image.Image:
        """8-bit RGB, padded to square where asked, then resized to the tower's size (PIL's bicubic, as VILA's ``resize``)."""
        image = prepare_image(image, self.processor.image_processor, self.pad_to_square)
        return image if image.size == (self.size, self.size) else image.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def image_tokens(self, image: Image.Image) -> int:
        return self.side * self.side

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        return geometry.squash_transform(
            image.width, image.height, size=self.size, patch=self.patch, merge=self.merge, pad_to_square=self.pad_to_square
        )


# ---------------------------------------------------------------- the converter
VILA_PARTS = ("llm", "vision_tower", "mm_projector")
VILA_PROJECTOR = {"layers.1.": "norm.", "layers.2.": "linear_1.", "layers.4.": "linear_2."}  # mlp_downsample's Sequential


def is_vila(source: Path) -> bool:
    """The VILA codebase's layout: the text model, the vision tower and the projector each in a subfolder."""
    present = [part for part in VILA_PARTS if (source / part).is_dir()]
    if present and len(present) < len(VILA_PARTS):
        missing = ", ".join(f"{p}/" for p in VILA_PARTS if p not in present)
        raise ConversionError(
            f"{source} is a VILA checkpoint without {missing}: download the whole model folder (VILA keeps each part apart)"
        )
    return bool(present)


def convert_vila(source: Path, out: Path) -> Path:
    """A VILA checkpoint (VILA1.5, VILA-M3: ``llm/``, ``vision_tower/``, ``mm_projector/``) to a :class:`VilaForConditionalGeneration` folder."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, SiglipVisionConfig

    original = json.loads((source / "config.json").read_text())
    projector_type = json.loads((source / "mm_projector" / "config.json").read_text()).get("mm_projector_type")
    if projector_type != "mlp_downsample":
        raise ConversionError(f"VILA projector {projector_type!r}: only mlp_downsample (VILA1.5, VILA-M3) is built here")
    vision_config = AutoConfig.from_pretrained(source / "vision_tower")
    if not isinstance(vision_config, SiglipVisionConfig):
        raise ConversionError(f"VILA vision tower '{vision_config.model_type}': only SigLIP (VILA1.5, VILA-M3) is built here")
    text_config = AutoConfig.from_pretrained(source / "llm")
    tokenizer = AutoTokenizer.from_pretrained(source / "llm")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # VILA-M3's conversations (MONAI's m3/eval/README.md): llama_3 for the Llama-3 LLM (8B), v1 for the 13B's Llama-2
    llama3 = "<|start_header_id|>" in tokenizer.get_vocab()
    tokenizer.chat_template = VILA_LLAMA3_TEMPLATE if llama3 else VICUNA_V1_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = VilaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        **vision_feature_fields(original, default_feature="cls_patch"),
    )
    weights = {("model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in load_weights(source / "llm").items()}
    weights |= {"model.vision_tower." + k: v for k, v in load_weights(source / "vision_tower").items()}
    for key, value in load_weights(source / "mm_projector").items():
        new = map_key(key, VILA_PROJECTOR.items())
        if new is None:
            raise ConversionError(f"mm_projector tensor {key!r} has no place in mlp_downsample")
        weights["model.multi_modal_projector." + new] = value
    make_room_for(image_token_id, config, weights)
    conversion.save_model(VilaForConditionalGeneration, config, weights, out)
    tokenizer.save_pretrained(out)
    AutoImageProcessor.from_pretrained(source / "vision_tower").save_pretrained(out)
    return out


register_converter(
    Converter("vila", lambda source, original: is_vila(source), lambda source, out, original, **_: convert_vila(source, out))
)


# ---------------------------------------------------------------- the family and its presets
def tiny(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random VILA (SigLIP at 70 px: 5 x 5 patches, padded and folded into 3 x 3 tokens; Llama text), as converted."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig

    from ..demo import tiny as builders

    tok = builders.build_tokenizer()
    tok.chat_template = VICUNA_V1_TEMPLATE
    config = VilaConfig(
        text_config=builders.text_config("llama", len(tok)),
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=70, patch_size=14
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    out = builders.save_random(VilaForConditionalGeneration, config, tok, seed, folder)
    tok.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 70, "width": 70}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


register_family(Family("vila", VilaAdapter, {"llava_vila": VilaForConditionalGeneration}, label="VILA family", tiny=tiny))
register_preset(
    # VILA-M3 ships in the VILA codebase's layout (llm/, vision_tower/, mm_projector/): convert it first
    ModelPreset(
        model_id="vila_m3",
        checkpoint="",
        chat_template=VILA_LLAMA3_TEMPLATE,
        pad_to_square=False,
        note="VILA-M3-8B (MONAI/Llama3-VILA-M3-8B) ships in the VILA layout: convert it with "
        "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
        family="vila",
        tokenisation="llava",
    ),
    ModelPreset(
        model_id="vila_m3_13b",
        checkpoint="",
        chat_template=VICUNA_V1_TEMPLATE,
        pad_to_square=False,
        note="VILA-M3-13B (MONAI/Llama3-VILA-M3-13B) ships in the VILA layout: convert it with "
        "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
        family="vila",
        tokenisation="llava",
    ),
)
