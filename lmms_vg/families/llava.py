"""The LLaVA family: LLaVA-1.5 and the medical models built on it, whole in one module.

- **Models**: HuatuoGPT-Vision (7B, 34B), LLaVA-Med v1.5, LLaVA-1.5, LLaVA-Tri (LLaVA's S2 multi-scale CLIP
  tower, ported here onto transformers' LLaVA classes), HuatuoGPT-V-Bio (BiomedCLIP's timm ViT mapped onto
  transformers' ViT), and the bundled demo model; ``lmms_vg_llava`` takes any ``LlavaForConditionalGeneration``.
- **Adapter** (:class:`LlavaAdapter`): one ``<image>`` placeholder expanded to a fixed token grid; pad to
  square done here (LLaVA-1.5's ``expand2square``) whatever processor class the checkpoint ships.
- **Converter** (:func:`convert_llava`): original LLaVA-format checkpoints (``llava_qwen2``, ``llava_qwen``,
  ``llava_mistral``, ``llava_llama``) to transformers-native folders (``lmms-vg convert``).
- **Templates** and **presets**: as the originals run them (tests/data/chat_templates.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LlavaConfig, LlavaProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaModel

from .. import convert as conversion
from .. import geometry
from ..adapters import (
    TOKENISATIONS,
    BaseAdapter,
    adopt_tokenizer,
    prompt_chunks,
    take_over_padding,
)
from ..architectures import InnerModelSwap, register
from ..convert import ConversionError, Converter, load_weights, make_room_for, map_key, register_converter
from ..engine import EngineError
from ..presets import DEMO_CHECKPOINT, Family, ModelPreset, register_family, register_preset
from ..prompts import VICUNA_V1_TEMPLATE

# ---------------------------------------------------------------- templates (each as its original code builds the prompt)
# Chat templates of the presets (the messages hold the image placeholders and the text), each as its model's original
# code builds the prompt; tests/fixtures/chat_templates.json holds the prompts that code gives (repository, path, commit).
# HuatuoGPT-Vision's cli.py (preprocess_huatuo): the user turn stripped, between <|user|> and <|assistant|> lines
HUATUO_TEMPLATE = "{% for message in messages %}<|user|>\n{{ message['content'] | trim }}\n<|assistant|>\n{% endfor %}"
# LLaVA-Med's ``mistral_instruct`` (SeparatorStyle.LLAMA_2, no system); its model_vqa.py strips the question
MISTRAL_INST_TEMPLATE = "{% for message in messages %}[INST] {{ message['content'] | trim }} [/INST]{% endfor %}"
# LLaVA-Tri (LLaVA-Med++): the MedTrinity codebase's ``conv_llama3`` (SeparatorStyle.MPT, sep <|eot_id|>)
LLAMA3_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endfor %}"
)


# ---------------------------------------------------------------- LLaVA's S2 tower (LLaVA-Tri) on transformers' classes
# As the S2 wrapper (``s2wrapper.forward``, split mode ``resize``) computes it: the processor resizes the
# image to the largest scale; for each scale the image is resized (bicubic) to it, cut into tiles of the
# smallest scale, each tile runs through the CLIP tower (layer ``vision_feature_layer``, CLS dropped), the
# tiles' feature maps are put back together, and every scale's map is area-resized to the smallest
# scale's grid; the maps are concatenated along channels (``hidden x scales``) before the projector.
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


# ---------------------------------------------------------------- the adapter
class LlavaAdapter(BaseAdapter):
    """LLaVA-1.5 family: one ``<image>`` placeholder expanded by the processor to a fixed token grid.

    ``pad_to_square``: pad each image to a square with the processor's mean colour before the
    processor sees it (LLaVA-1.5's ``expand2square``), whatever processor class the checkpoint
    ships (a ``CLIPImageProcessor`` ignores ``do_pad``); None keeps the processor's own ``do_pad``.
    """

    shares_prefix = True  # the image tokens' positions do not depend on the text: one prefix serves every prompt
    positions_by_index = True
    cell_order: list[int] | None = None  # image tokens in row-major cell order already (see VilaAdapter)

    def __init__(
        self,
        model,
        processor,
        chat_template: str | None = None,
        name: str = "model",
        pad_to_square: bool | None = None,
        tokenisation: str = "whole",
    ):
        if tokenisation not in TOKENISATIONS:
            raise ValueError(f"tokenisation {tokenisation!r} is not one of {sorted(TOKENISATIONS)}")
        self.tokenisation = tokenisation
        self.model = model
        self.processor, self.pad_to_square = take_over_padding(processor, pad_to_square)
        self.tokenizer = adopt_tokenizer(processor.tokenizer, chat_template, name)
        self.name = name
        if getattr(self.processor, "patch_size", None) is None:  # some -hf conversions ship without it
            self.processor.patch_size = model.config.vision_config.patch_size
        self.image_token_id = model.config.image_token_id
        self._n_image_tokens: int | None = None

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat-formatted prompt with one image placeholder per image before the text (the LLaVA codebase's order)."""
        message = [{"role": "user", "content": "<image>\n" * n_images + text}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's ids around its image placeholders, tokenised as the original code does (:func:`prompt_chunks`)."""
        return prompt_chunks(self.tokenizer, self.prompt(text, n_images), self.placeholder, self.image_token_id, self.tokenisation)

    def image_tokens(self, image: Image.Image) -> int:
        """How many tokens the processor expands the placeholder to for this image (fixed grid for LLaVA-1.5)."""
        if self._n_image_tokens is None:
            ids = self.processor(images=[self.model_image(image)], text=[self.placeholder], return_tensors="pt")["input_ids"][0]
            self._n_image_tokens = int((ids == self.image_token_id).sum())
        return self._n_image_tokens

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        """How this model's processor maps the image's pixels to its token grid."""
        ip = self.processor.image_processor
        size = dict(ip.size)
        crop = dict(ip.crop_size) if getattr(ip, "do_center_crop", False) and ip.crop_size else None
        if "shortest_edge" not in size:
            raise EngineError(f"{self.name}: image processor size {size} is not a shortest-edge resize; see README 'Adding a model'")
        return geometry.llava_transform(
            image.width,
            image.height,
            pad_to_square=self.pad_to_square,
            shortest_edge=size["shortest_edge"],
            crop=(crop["height"], crop["width"]) if crop else None,
            patch=self.processor.patch_size,
        )


# ---------------------------------------------------------------- the converter (``lmms-vg convert``)
# The LLaVA codebase's layout: the text model's keys at ``model.*``, the projector at ``model.mm_projector.{0,2}``
# (mlp2x_gelu), no ``<image>`` token (the code splices image features at id -200). The vision tower is a
# CLIP tower (``model.vision_tower.vision_tower.vision_model.*`` or a separate CLIP checkpoint; with
# ``s2: true``, LLaVA's ``CLIPVisionTowerS2``) or an open_clip timm ViT (BiomedCLIP for HuatuoGPT-V-Bio:
# ``model.vision_tower.vision_tower.trunk.*`` or ``open_clip_config.json`` + its weights), which maps onto
# transformers' ViT.
TEXT_TYPES = {"llava_qwen2": "qwen2", "llava_qwen": "qwen2", "llava_mistral": "mistral", "llava_llama": "llama"}
TEMPLATES = {
    "llava_qwen2": HUATUO_TEMPLATE,
    "llava_qwen": HUATUO_TEMPLATE,
    "llava_mistral": MISTRAL_INST_TEMPLATE,
    "llava_llama": VICUNA_V1_TEMPLATE,
}
TIMM_PREFIX = "model.vision_tower.vision_tower.trunk."  # OpenCLIPVisionTower keeps open_clip's ``visual``: trunk + head
VIT_HEAD_DIM = 64  # every timm ViT (tiny .. huge) has 64-dimensional heads: the head count the weights do not say
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Tower:
    """A vision tower ready for a transformers LLaVA model: its config, its weights under the model's names, its preprocessing."""

    config: object  # CLIPVisionConfig or ViTConfig
    weights: dict[str, torch.Tensor]  # model.vision_tower.*
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


def vision_tower_weights(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint's vision weights under the LLaVA codebase's names (CLIPModel or CLIPVisionModel files)."""
    tower = {}
    for key, value in clip.items():
        key = key.removeprefix("vision_model.")
        if not key.startswith(("text_model.", "logit_scale", "visual_projection", "text_projection")):
            tower["model.vision_tower.vision_tower.vision_model." + key] = value
    return tower


def clip_tower(original: dict, weights: dict[str, torch.Tensor], folder: Path | None) -> Tower:
    """LLaVA's CLIPVisionTower: weights in the checkpoint or in a CLIP folder (whose config is needed either way)."""
    from transformers import CLIPVisionConfig

    if folder is None or not folder.exists():
        raise ConversionError(
            f"no CLIP vision tower config: pass --vision-tower <folder of {original.get('mm_vision_tower', 'the CLIP tower')}>"
        )
    prefix = "model.vision_tower.vision_tower."
    inside = {k: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
    inside = inside or vision_tower_weights(load_weights(folder))
    mapped = {"model.vision_tower." + k.removeprefix(prefix + "vision_model."): v for k, v in inside.items()}
    return Tower(CLIPVisionConfig.from_pretrained(folder), mapped)


def open_clip_tower(original: dict, weights: dict[str, torch.Tensor], folder: Path | None) -> Tower:
    """LLaVA-NeXT's OpenCLIPVisionTower over a timm ViT (BiomedCLIP), as transformers' ViT.

    timm's blocks are pre-norm (LayerNorm eps 1e-6), fused qkv, exact GELU: the same computation as
    transformers' ViT layer, so the weights only move (qkv split into q, k, v). Sizes come from the
    weights; the head count from timm's 64-dimensional heads. open_clip's projection head is not used
    by LLaVA and is dropped; transformers' ViT pooler, unused too, gets zeros.
    """
    from transformers import ViTConfig

    trunk = {k.removeprefix(TIMM_PREFIX): weights.pop(k) for k in [k for k in weights if k.startswith(TIMM_PREFIX)]}
    for key in [k for k in weights if k.startswith("model.vision_tower.vision_tower.")]:
        weights.pop(key)  # open_clip's head (projection to the contrastive space)
    preprocess = {}
    if folder is not None and (folder / "open_clip_config.json").exists():
        preprocess = json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
        if not trunk:
            trunk = {
                k.removeprefix("visual.trunk."): v for k, v in load_weights(folder, "open_clip").items() if k.startswith("visual.trunk.")
            }
    if not trunk:
        raise ConversionError(
            f"the checkpoint holds no open_clip vision tower ({TIMM_PREFIX}*): pass --vision-tower <folder of "
            f"{original.get('mm_vision_tower', 'the open_clip model')}> with open_clip_config.json and its weights"
        )
    patch = trunk["patch_embed.proj.weight"]
    hidden, grid = patch.shape[0], round((trunk["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in trunk if k.startswith("blocks."))
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=hidden // VIT_HEAD_DIM,
        intermediate_size=trunk["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        layer_norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in trunk,
        hidden_act="gelu",
    )
    out = "model.vision_tower."
    mapped = {
        out + "embeddings.cls_token": trunk["cls_token"],
        out + "embeddings.position_embeddings": trunk["pos_embed"],
        out + "embeddings.patch_embeddings.projection.weight": patch,
        out + "embeddings.patch_embeddings.projection.bias": trunk["patch_embed.proj.bias"],
        out + "layernorm.weight": trunk["norm.weight"],
        out + "layernorm.bias": trunk["norm.bias"],
        out + "pooler.dense.weight": torch.zeros(hidden, hidden, dtype=patch.dtype),
        out + "pooler.dense.bias": torch.zeros(hidden, dtype=patch.dtype),
    }
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"{out}layers.{i}."
        for part in ("weight", "bias"):
            if block + "attn.qkv." + part not in trunk:
                continue
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), trunk[block + "attn.qkv." + part].chunk(3)):
                mapped[f"{layer}attention.{name}.{part}"] = chunk
            mapped[f"{layer}attention.o_proj.{part}"] = trunk[block + "attn.proj." + part]
            mapped[f"{layer}layernorm_before.{part}"] = trunk[block + "norm1." + part]
            mapped[f"{layer}layernorm_after.{part}"] = trunk[block + "norm2." + part]
            mapped[f"{layer}mlp.fc1.{part}"] = trunk[block + "mlp.fc1." + part]
            mapped[f"{layer}mlp.fc2.{part}"] = trunk[block + "mlp.fc2." + part]
    return Tower(config, mapped, list(preprocess.get("mean", CLIP_MEAN)), list(preprocess.get("std", CLIP_STD)))


def is_open_clip(original: dict, weights: dict, folder: Path | None) -> bool:
    named = str(original.get("mm_vision_tower", "")).startswith(("open_clip_hub:", "hf-hub:"))
    return named or any(k.startswith(TIMM_PREFIX) for k in weights) or bool(folder and (folder / "open_clip_config.json").exists())


def vision_feature_fields(original: dict, default_feature: str) -> dict:
    """The HF config's vision-feature fields from a LLaVA-codebase config: the tower layer (``mm_vision_select_layer``)
    and whether the CLS token is dropped (``mm_vision_select_feature`` "patch"); codebases differ in the feature's default
    (LLaVA "patch", VILA "cls_patch")."""
    select = original.get("mm_vision_select_feature", default_feature)
    return {
        "vision_feature_layer": int(original.get("mm_vision_select_layer", -2)),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
    }


def convert_llava(source: Path, out: Path, original: dict, arch: str | None = None, vision_tower: str | Path | None = None) -> Path:
    """An original LLaVA-format checkpoint (its config ``original``) written as a transformers-native folder into ``out``."""
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    arch = arch or original.get("model_type")
    if arch not in TEXT_TYPES:
        raise ConversionError(f"model_type {arch!r} is not one of {sorted(TEXT_TYPES)}; pass --arch if the config does not say")
    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(
            f"projector {original.get('mm_projector_type')!r}: only mlp2x_gelu (LLaVA-1.5) has a transformers-native class"
        )
    weights = load_weights(source)
    folder = Path(vision_tower) if vision_tower else source / "vit"
    folder = folder if folder.exists() else None
    open_clip = is_open_clip(original, weights, folder)
    s2_scales = scales_of(original)
    if open_clip and s2_scales:
        raise ConversionError("an S2 (multi-scale) open_clip tower: LLaVA's S2 wrapper is defined for its CLIP tower only")
    tower = open_clip_tower(original, weights, folder) if open_clip else clip_tower(original, weights, folder)
    text_fields = {k: v for k, v in original.items() if not k.startswith(("mm_", "architectures", "model_type", "auto_map", "_name", "s2"))}
    text_config = AutoConfig.for_model(TEXT_TYPES[arch], **text_fields)
    vision_config = tower.config

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config_class, model_class = (
        (LlavaS2Config, LlavaS2ForConditionalGeneration) if s2_scales else (LlavaConfig, LlavaForConditionalGeneration)
    )
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        **vision_feature_fields(original, default_feature="patch"),
        projector_hidden_act="gelu",
        **({"s2_scales": list(s2_scales)} if s2_scales else {}),
    )
    mapped, unmapped = dict(tower.weights), []
    for key, value in weights.items():
        new = map_key(key)
        (unmapped.append(key) if new is None else mapped.__setitem__(new, value))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensors have no place in {model_class.__name__}, e.g. {unmapped[:3]}")
    make_room_for(image_token_id, config, mapped)
    conversion.save_model(model_class, config, mapped, out)
    # S2: the processor resizes to the largest scale; one token per (patch x largest/smallest) pixels of it
    size = max(s2_scales) if s2_scales else vision_config.image_size
    patch = vision_config.patch_size * (max(s2_scales) // min(s2_scales) if s2_scales else 1)
    image_processor = LlavaImageProcessorPil(
        do_pad=original.get("image_aspect_ratio", "pad") == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=tower.image_mean,
        image_std=tower.image_std,
    )
    template = tokenizer.chat_template if arch == "llava_llama" and tokenizer.chat_template else TEMPLATES[arch]
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template,
    ).save_pretrained(out)
    return out


register_converter(Converter("llava", lambda source, original: original.get("model_type") in TEXT_TYPES, convert_llava, priority=10))


# ---------------------------------------------------------------- the family and its presets
def tiny(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random LLaVA-1.5 (CLIP at 112 px, Qwen2 text) with its processor (HuatuoGPT-Vision's padding)."""
    from ..demo import tiny as builders

    return builders.build_llava(folder, seed=seed)


register_family(
    Family(
        "llava",
        LlavaAdapter,
        {"llava": "LlavaForConditionalGeneration", "llava_s2": LlavaS2ForConditionalGeneration},
        label="LLaVA family",
        tiny=tiny,
    )
)
register_preset(
    # HuatuoGPT-Vision's chatbot keeps at most 6 images per item (its max_image_num)
    ModelPreset(
        model_id="huatuo",
        checkpoint="FreedomIntelligence/HuatuoGPT-Vision-7B-hf",
        chat_template=HUATUO_TEMPLATE,
        pad_to_square=True,
        heads="huatuo_7b",
        knockout_layers=(16,),
        max_images=6,
        tokenisation="huatuo",
    ),
    ModelPreset(
        model_id="huatuo_34b",
        checkpoint="FreedomIntelligence/HuatuoGPT-Vision-34B-hf",
        chat_template=HUATUO_TEMPLATE,
        pad_to_square=True,
        note="no published heads: calibrate",
        max_images=6,
        tokenisation="huatuo",
    ),
    ModelPreset(
        model_id="llava_med",
        checkpoint="chaoyinshe/llava-med-v1.5-mistral-7b-hf",
        chat_template=MISTRAL_INST_TEMPLATE,
        pad_to_square=True,
        note="no published heads: calibrate",
        tokenisation="llava",
    ),
    ModelPreset(
        model_id="llava15",
        checkpoint="llava-hf/llava-1.5-7b-hf",
        chat_template=VICUNA_V1_TEMPLATE,
        pad_to_square=False,
        note="general-domain reference; llava-hf's processor resizes and centre-crops",
        tokenisation="llava",
    ),
    # published only in their own codebases' layouts: `lmms-vg convert` makes the folder that pretrained= names
    ModelPreset(
        model_id="llava_tri",
        checkpoint="",
        chat_template=LLAMA3_LLAVA_TEMPLATE,
        pad_to_square=True,
        note="LLaVA-Tri (LLaVA-Med++, S2 CLIP + Llama-3-8B) ships in the LLaVA layout (e.g. yunfeixie/vqa_rad_release): "
        "convert it with `lmms-vg convert <download> <folder>` and give pretrained=<folder>",
        tokenisation="llava",
    ),
    ModelPreset(
        model_id="huatuo_bio",
        checkpoint="",
        chat_template=HUATUO_TEMPLATE,
        pad_to_square=True,
        note="HuatuoGPT-V-Bio (BiomedCLIP + Qwen2, trained with LLaVA-NeXT) has no public checkpoint: convert the authors' "
        "with `lmms-vg convert <checkpoint> <folder> [--vision-tower <BiomedCLIP folder>]` and give pretrained=<folder>",
        tokenisation="huatuo",
    ),
    ModelPreset(
        model_id="lmms_vg_demo",
        checkpoint=DEMO_CHECKPOINT,
        chat_template=HUATUO_TEMPLATE,
        pad_to_square=True,
        heads="demo",
        note="bundled demo model (lmms_vg/demo/train.py)",
        tokenisation="huatuo",
    ),
)
