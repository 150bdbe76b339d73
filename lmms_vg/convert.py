"""Original LLaVA-format checkpoints (``llava_qwen2``, ``llava_mistral``, ``llava_llama``) to transformers-native folders.

HuatuoGPT-Vision, LLaVA-Med and LLaVA-Tri ship the LLaVA codebase's layout: the text model's keys at
``model.*``, the projector at ``model.mm_projector.{0,2}`` (mlp2x_gelu), the CLIP tower at
``model.vision_tower.vision_tower.vision_model.*`` or in a separate CLIP checkpoint, and no
``<image>`` token (the code splices image features at id -200). The output loads as
``LlavaForConditionalGeneration`` with its processor, weights in safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .prompts import HUATUO_TEMPLATE, MISTRAL_INST_TEMPLATE, VICUNA_TEMPLATE

TEXT_TYPES = {"llava_qwen2": "qwen2", "llava_mistral": "mistral", "llava_llama": "llama"}
TEMPLATES = {"llava_qwen2": HUATUO_TEMPLATE, "llava_mistral": MISTRAL_INST_TEMPLATE, "llava_llama": VICUNA_TEMPLATE}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# original prefix -> LlavaForConditionalGeneration's (in-memory) prefix, most specific first
KEY_MAP = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as given; the message says what is missing."""


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors when present, else PyTorch files (loaded weights-only)."""
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        return {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin in {folder}")
    return {k: v for shard in shards for k, v in torch.load(shard, map_location="cpu", weights_only=True).items()}


def vision_tower_weights(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint's vision weights under the LLaVA codebase's names (CLIPModel or CLIPVisionModel files)."""
    tower = {}
    for key, value in clip.items():
        key = key.removeprefix("vision_model.")
        if not key.startswith(("text_model.", "logit_scale", "visual_projection", "text_projection")):
            tower["model.vision_tower.vision_tower.vision_model." + key] = value
    return tower


def map_key(key: str) -> str | None:
    for old, new in KEY_MAP:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def convert(source: str | Path, out: str | Path, arch: str | None = None, vision_tower: str | Path | None = None) -> Path:
    """Write a transformers-native LLaVA folder (config, safetensors, tokenizer, processor) to ``out``."""
    from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    source, out = Path(source), Path(out)
    if not (source / "config.json").exists():
        raise ConversionError(f"{source} has no config.json: give the folder of an original LLaVA-format checkpoint")
    original = json.loads((source / "config.json").read_text())
    arch = arch or original.get("model_type")
    if arch not in TEXT_TYPES:
        raise ConversionError(f"model_type {arch!r} is not one of {sorted(TEXT_TYPES)}; pass --arch if the config does not say")
    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(
            f"projector {original.get('mm_projector_type')!r}: only mlp2x_gelu (LLaVA-1.5) has a transformers-native class"
        )
    weights = load_weights(source)
    tower = Path(vision_tower) if vision_tower else source / "vit"
    has_tower = any(k.startswith("model.vision_tower.vision_tower.") for k in weights)
    if not tower.exists():
        raise ConversionError(
            f"no CLIP vision tower config: pass --vision-tower <folder of {original.get('mm_vision_tower', 'the CLIP tower')}>"
        )
    if not has_tower:
        weights.update(vision_tower_weights(load_weights(tower)))
    text_fields = {k: v for k, v in original.items() if not k.startswith(("mm_", "architectures", "model_type", "auto_map", "_name"))}
    text_config = AutoConfig.for_model(TEXT_TYPES[arch], **text_fields)
    vision_config = CLIPVisionConfig.from_pretrained(tower)

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    select = original.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
    )
    mapped, unmapped = {}, []
    for key, value in weights.items():
        new = map_key(key)
        (unmapped.append(key) if new is None else mapped.__setitem__(new, value))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} tensors have no place in LlavaForConditionalGeneration, e.g. {unmapped[:3]}")
    if image_token_id >= text_config.vocab_size:  # the <image> row is never read as input; keep it out of the argmax
        text_config.vocab_size = image_token_id + 1
        for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            old = mapped[name]
            mapped[name] = torch.cat([old, old.mean(0, keepdim=True).expand(text_config.vocab_size - old.shape[0], -1)])
        config.text_config = text_config
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(mapped, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConversionError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights() if getattr(config.text_config, "tie_word_embeddings", False) else None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    size = vision_config.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=original.get("image_aspect_ratio", "pad") == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    template = tokenizer.chat_template if arch == "llava_llama" and tokenizer.chat_template else TEMPLATES[arch]
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template,
    ).save_pretrained(out)
    return out
