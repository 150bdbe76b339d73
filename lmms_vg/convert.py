"""Original LLaVA-format checkpoints (``llava_qwen2``, ``llava_qwen``, ``llava_mistral``, ``llava_llama``) to transformers-native folders.

HuatuoGPT-Vision, LLaVA-Med and LLaVA-Tri ship the LLaVA codebase's layout (HuatuoGPT-V-Bio, trained
with LLaVA-NeXT, the same): the text model's keys at ``model.*``, the projector at
``model.mm_projector.{0,2}`` (mlp2x_gelu), and no ``<image>`` token (the code splices image features
at id -200). The vision tower is one of:

- a CLIP tower (``CLIPVisionTower``): ``model.vision_tower.vision_tower.vision_model.*``, or a separate
  CLIP checkpoint; with ``s2: true`` in the config, LLaVA's ``CLIPVisionTowerS2`` (LLaVA-Tri), which
  loads as :class:`lmms_vg.s2.LlavaS2ForConditionalGeneration`;
- an open_clip timm ViT (``OpenCLIPVisionTower``, BiomedCLIP for HuatuoGPT-V-Bio):
  ``model.vision_tower.vision_tower.trunk.*``, or a separate open_clip checkpoint
  (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``); it maps onto transformers' ViT.

The output loads with transformers' classes and its processor, weights in safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import s2, writing
from .prompts import HERMES2_TEMPLATE, HUATUO_TEMPLATE, MISTRAL_INST_TEMPLATE, VICUNA_V1_TEMPLATE, VILA_LLAMA3_TEMPLATE

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
# original prefix -> LlavaForConditionalGeneration's (in-memory) prefix, most specific first (the tower is mapped apart)
KEY_MAP = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as given; the message says what is missing."""


def load_weights(folder: Path, stem: str = "pytorch_model") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors when present, else PyTorch files (``<stem>*.bin``, loaded weights-only)."""
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors.torch import load_file

        return {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    shards = sorted(folder.glob(f"{stem}*.bin"))
    if not shards:
        raise ConversionError(f"no *.safetensors or {stem}*.bin in {folder}")
    return {k: v for shard in shards for k, v in torch.load(shard, map_location="cpu", weights_only=True).items()}


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


def make_room_for(image_token_id: int, config, weights: dict[str, torch.Tensor]) -> None:
    """Grow the vocabulary to hold an added image token; its rows (never read as input) are the mean row, out of the argmax's way."""
    text_config = config.text_config
    if image_token_id < text_config.vocab_size:
        return
    text_config.vocab_size = image_token_id + 1
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        old = weights[name]
        weights[name] = torch.cat([old, old.mean(0, keepdim=True).expand(text_config.vocab_size - old.shape[0], -1)])
    config.text_config = text_config


def save_model(model_class, config, weights: dict[str, torch.Tensor], out: Path) -> None:
    """``model_class(config)`` holding exactly ``weights`` (built on the meta device, no random init), saved as safetensors."""
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConversionError(
            f"{model_class.__name__}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if getattr(config.text_config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)


def map_key(key: str, table: Iterable[tuple[str, str]] = KEY_MAP) -> str | None:
    """``key`` with the first of ``table``'s (old prefix, new prefix) that it starts with replaced; None if none does."""
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def convert(
    source: str | Path, out: str | Path, arch: str | None = None, vision_tower: str | Path | None = None, force: bool = False
) -> Path:
    """Write a transformers-native folder (config, safetensors, tokenizer, processor) to ``out``.

    Written into a staging folder and moved into place when complete (an interrupted conversion leaves
    nothing half-written); ``out`` may not hold files lmms-vg did not write, nor be the source, unless ``force``.
    """
    source, target = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not (source / "config.json").exists():
        raise ConversionError(f"{source} has no config.json: give the folder of an original LLaVA-format checkpoint")
    if target == source and not force:
        raise ConversionError(f"the output folder is the source ({source}): its config and weights would be replaced; give another folder")
    with writing.staged(target, force, exclusive=True, what="lmms-vg convert") as stage:
        _convert(source, stage, arch, vision_tower)
    return target


def _convert(source: Path, out: Path, arch: str | None, vision_tower: str | Path | None) -> Path:
    from transformers import AutoConfig, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if is_vila(source):
        return convert_vila(source, out)
    original = json.loads((source / "config.json").read_text())
    if original.get("model_type") == "internvl_chat":
        return convert_internvl(source, out, original)
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
    s2_scales = s2.scales_of(original)
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
    select = original.get("mm_vision_select_feature", "patch")
    config_class, model_class = (
        (s2.LlavaS2Config, s2.LlavaS2ForConditionalGeneration) if s2_scales else (LlavaConfig, LlavaForConditionalGeneration)
    )
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
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
    save_model(model_class, config, mapped, out)
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
    """A VILA checkpoint (VILA1.5, VILA-M3: ``llm/``, ``vision_tower/``, ``mm_projector/``) to a :class:`lmms_vg.vila.VilaForConditionalGeneration` folder."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, SiglipVisionConfig

    from . import vila

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
    select = original.get("mm_vision_select_feature", "cls_patch")
    config = vila.VilaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
    )
    weights = {("model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in load_weights(source / "llm").items()}
    weights |= {"model.vision_tower." + k: v for k, v in load_weights(source / "vision_tower").items()}
    for key, value in load_weights(source / "mm_projector").items():
        new = map_key(key, VILA_PROJECTOR.items())
        if new is None:
            raise ConversionError(f"mm_projector tensor {key!r} has no place in mlp_downsample")
        weights["model.multi_modal_projector." + new] = value
    make_room_for(image_token_id, config, weights)
    save_model(vila.VilaForConditionalGeneration, config, weights, out)
    tokenizer.save_pretrained(out)
    AutoImageProcessor.from_pretrained(source / "vision_tower").save_pretrained(out)
    return out


IMAGENET_MEAN = [0.485, 0.456, 0.406]  # InternVL's build_transform
IMAGENET_STD = [0.229, 0.224, 0.225]
INTERNVL_TEMPLATES = {"Hermes-2": HERMES2_TEMPLATE}
INTERN_VIT_LAYER = {  # InternViT block (remote code) -> transformers' InternVLVisionLayer
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.proj.": "attention.projection_layer.",
    "attn.q_norm.": "attention.q_norm.",
    "attn.k_norm.": "attention.k_norm.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
}


def internvl_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of InternVLChatModel (remote code) under transformers' InternVL names (qkv split in three)."""
    embeddings = {
        "class_embedding": "cls_token",
        "patch_embedding.": "patch_embeddings.projection.",
        "position_embedding": "position_embeddings",
    }
    if key.startswith("vision_model.embeddings."):
        rest = key.removeprefix("vision_model.embeddings.")
        new = map_key(rest, embeddings.items())
        return {} if new is None else {"model.vision_tower.embeddings." + new: value}
    if key.startswith("vision_model.encoder.layers."):
        index, rest = key.removeprefix("vision_model.encoder.layers.").split(".", 1)
        layer = f"model.vision_tower.encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            part = rest.removeprefix("attn.qkv.")
            return {f"{layer}attention.{n}.{part}": c for n, c in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3))}
        new = map_key(rest, INTERN_VIT_LAYER.items())
        return {} if new is None else {layer + new: value}
    if key.startswith("mlp1."):
        index, part = key.removeprefix("mlp1.").split(".", 1)
        name = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}.get(index)
        return {} if name is None else {f"model.multi_modal_projector.{name}.{part}": value}
    if key.startswith("language_model.model."):
        return {"model.language_model." + key.removeprefix("language_model.model."): value}
    if key.startswith("language_model.lm_head."):
        return {key.removeprefix("language_model."): value}
    return {}


def convert_internvl(source: Path, out: Path, original: dict) -> Path:
    """An InternVL-Chat checkpoint (remote code: MedRegA, InternVL-Chat-V1-2) to transformers' InternVL classes."""
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, LlamaConfig, SiglipImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from . import internvl

    llm, vit = original.get("llm_config", {}), original.get("vision_config", {})
    if (llm.get("architectures") or ["?"])[0] != "LlamaForCausalLM":
        raise ConversionError(
            f"InternVL with a {(llm.get('architectures') or ['?'])[0]} LLM: only Llama-architecture LLMs (Yi, as MedRegA) are mapped"
        )
    if original.get("dynamic_image_size"):
        raise ConversionError(
            "dynamic_image_size (tiling) is on in this InternVL checkpoint: only fixed-size InternVL (V1-2, MedRegA) is built here"
        )
    size = int(original.get("force_image_size") or vit["image_size"])
    vision_config = InternVLVisionConfig(
        hidden_size=vit["hidden_size"],
        num_hidden_layers=vit["num_hidden_layers"],
        num_attention_heads=vit["num_attention_heads"],
        intermediate_size=vit["intermediate_size"],
        image_size=[size, size],
        patch_size=[vit["patch_size"], vit["patch_size"]],
        norm_type=vit.get("norm_type", "rms_norm"),
        use_qk_norm=bool(vit.get("qk_normalization", False)),
        attention_bias=bool(vit.get("qkv_bias", True)),
        layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
        hidden_act=vit.get("hidden_act", "gelu"),
        use_mean_pooling=True,  # InternViT has no final norm
        use_absolute_position_embeddings=True,
    )
    text_config = LlamaConfig(**{k: v for k, v in llm.items() if k not in ("architectures", "model_type", "auto_map", "_name_or_path")})
    tokenizer = AutoTokenizer.from_pretrained(source)
    context = "<IMG_CONTEXT>"
    if tokenizer.convert_tokens_to_ids(context) in (None, tokenizer.unk_token_id):
        raise ConversionError(f"{source}: the tokenizer has no {context} token; give the InternVL checkpoint's own tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    template = original.get("template", "Hermes-2")
    if template not in INTERNVL_TEMPLATES:
        raise ConversionError(f"InternVL template {template!r}: known here {sorted(INTERNVL_TEMPLATES)}")
    tokenizer.chat_template = INTERNVL_TEMPLATES[template]
    v1 = original.get("ps_version", "v1") == "v1"
    config_class, model_class = (
        (internvl.InternVLPs1Config, internvl.InternVLPs1ForConditionalGeneration)
        if v1
        else (InternVLConfig, InternVLForConditionalGeneration)
    )
    config = config_class(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(context),
        downsample_ratio=float(original.get("downsample_ratio", 0.5)),
        vision_feature_layer=int(original.get("select_layer", -1)),
        vision_feature_select_strategy="default",  # extract_feature drops the CLS token
        projector_hidden_act="gelu",
    )
    weights, unmapped = {}, []
    for key, value in load_weights(source).items():
        mapped = internvl_key(key, value)
        (weights.update(mapped) if mapped else unmapped.append(key))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} InternVL tensors have no place in {model_class.__name__}, e.g. {unmapped[:3]}")
    save_model(model_class, config, weights, out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out
