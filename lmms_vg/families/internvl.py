"""The InternVL-Chat family (MedRegA: InternVL-Chat-V1-2), whole in one module.

- **Port**: transformers' ``InternVLForConditionalGeneration`` computes InternViT (RMSNorm, fused-then-split
  qkv with q/k RMSNorm over the full width, layer scale), the pixel shuffle and ``mlp1`` as InternVL
  does, with one difference: its pixel shuffle is InternVL's ``ps_version: v2``. V1-2 checkpoints
  (MedRegA) were trained with ``v1``, which leaves the shuffled grid transposed: the same tokens in
  column-major order, as VILA's fold. :class:`InternVLPs1ForConditionalGeneration` keeps that order;
  the adapter's ``cell_order`` maps the maps back to row-major cells for the grounding metrics.
- **Adapter** (:class:`InternVLAdapter`): 448-px images, ``<img><IMG_CONTEXT>x256</img>`` where the text
  has ``<image>``, the whole prompt tokenised (InternVL's ``chat``).
- **Converter** (:func:`convert_internvl`): InternVL-Chat's remote-code layout.
- **Template** and **preset**: Hermes-2 as MedRegA's own ``conversation.py`` defines it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import InternVLConfig
from transformers.models.internvl.modeling_internvl import InternVLForConditionalGeneration, InternVLModel

from .. import convert as conversion
from ..architectures import InnerModelSwap, register
from ..convert import ConversionError, Converter, load_weights, map_key, register_converter
from ..presets import Family, ModelPreset, register_family, register_preset
from .vila import VilaAdapter

# ``Hermes-2`` (SeparatorStyle.MPT) as MedRegA's own src/internvl/conversation.py and InternVL-Chat-V1-2 define it:
# system message "Answer the questions." (the Chinese one came with InternVL 2.0)
HERMES2_TEMPLATE = (
    "{% for message in messages %}<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{{ message['content'] }}"
    "<|im_end|><|im_start|>assistant\n{% endfor %}"
)


# ---------------------------------------------------------------- the port
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


# ---------------------------------------------------------------- the adapter
class InternVLAdapter(VilaAdapter):
    """InternVL-Chat-V1-2 (MedRegA): a fixed 448-px InternViT, images resized to it, 2 x 2 pixel shuffle.

    Its placeholder is ``<img>`` + ``<IMG_CONTEXT>`` x N + ``</img>`` where the text holds ``<image>``
    (InternVL's ``chat``); the shuffle is VILA's fold without the padding (the grid is even), and ``v1``
    checkpoints keep VILA's column-major token order.
    """

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="whole"):
        super().__init__(model, processor, chat_template, name, pad_to_square, tokenisation)
        if model.config.model_type != "internvl_ps1":
            self.cell_order = None  # ps_version v2: row-major already
        self.context = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.placeholder = self.context

    def prompt(self, text: str, n_images: int = 1) -> str:
        """InternVL's chat(): ``<image>`` in the question becomes ``<img>`` + the context tokens + ``</img>``."""
        return super().prompt(text, n_images).replace("<image>", f"<img>{self.context}</img>")


# ---------------------------------------------------------------- the converter
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
        (InternVLPs1Config, InternVLPs1ForConditionalGeneration) if v1 else (InternVLConfig, InternVLForConditionalGeneration)
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
    conversion.save_model(model_class, config, weights, out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out


register_converter(
    Converter(
        "internvl",
        lambda source, original: original.get("model_type") == "internvl_chat",
        lambda source, out, original, **_: convert_internvl(source, out, original),
    )
)


# ---------------------------------------------------------------- the family and its preset
def tiny(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random InternVL-Chat-V1-2 (MedRegA's layout as converted: InternViT at 112 px, 8 x 8 patches shuffled ``v1``
    into 4 x 4 tokens; Llama text)."""
    from transformers import SiglipImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from ..demo import tiny as builders

    tok = builders.build_tokenizer(image_token=False, extra_special=("<img>", "</img>", "<IMG_CONTEXT>"))
    tok.chat_template = HERMES2_TEMPLATE
    vision = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[112, 112],
        patch_size=[14, 14],
        norm_type="rms_norm",
        use_qk_norm=True,
        attention_bias=False,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
    )
    config = InternVLPs1Config(
        vision_config=vision,
        text_config=builders.text_config("llama", len(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    out = builders.save_random(InternVLPs1ForConditionalGeneration, config, tok, seed, folder)
    tok.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 112, "width": 112}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out


register_family(
    Family(
        "internvl",
        InternVLAdapter,
        {"internvl_ps1": InternVLPs1ForConditionalGeneration, "internvl": "InternVLForConditionalGeneration"},
        label="InternVL family",
        tiny=tiny,
    )
)
register_preset(
    ModelPreset(
        model_id="medrega",
        checkpoint="",
        chat_template=HERMES2_TEMPLATE,
        pad_to_square=False,
        note="MedRegA (Luxuriant16/medrega: InternVL-Chat-V1-2, InternViT-6B + Yi-34B) ships as remote code: convert it with "
        "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
        family="internvl",
    )
)
