"""Tiny random-weight models of the real architectures, built from configs and saved locally (tests, benchmarks, the demo).

They load through the same ``from_pretrained`` code as the real checkpoints, so tests,
benchmarks and the demo exercise the real loading path offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..families.llava import HUATUO_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|endoftext|>", "<image>", "<|user|>", "<|assistant|>"]
_CORPUS = (
    "What is the shape in the image? Where is the red circle? Which side is the lesion on? "
    "Write a general description of the image. Answer the question using a single word or phrase. "
    "Answer with the option's letter from the given choices directly. A. B. C. D. yes no left right top bottom "
    "square circle triangle red green blue liver lung brain kidney heart abnormal normal CT MRI X-ray "
    "Is the square on the left or the right? Is the red shape on the left or the right? What color is the circle? "
    "What shape is green? What color is the triangle? What shape is blue?\n"
    "Is the colored shape on the left or the right? What color is the colored shape? What shape is colored?\n"
    # answers start a line with no space before them: make the bare words single tokens too
    "left\nright\nred\ngreen\nblue\nsquare\ncircle\ntriangle\nyes\nno\none\ntwo\nthree\n"
)


# Qwen2's pre-tokenizer split (its tokenizer.json): runs of newlines stay one piece, so "\n\n" can be one token
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def build_tokenizer(
    vocab_size: int = 1000,
    extra_special: tuple[str, ...] = (),
    image_token: bool = True,
    extra_corpus: str = "",
    qwen2_split: bool = False,
    bos: str | None = None,
    extra_marks: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on a fixed corpus (deterministic), plus ``extra_corpus``.

    The vocabulary is large enough that the corpus words become single tokens, so prompt lengths
    are close to a real LLM tokenizer's (benchmarks depend on that). ``qwen2_split``: Qwen2's
    pre-tokenizer (GPT-2's otherwise, which the bundled demo model was trained with). ``bos``: a
    BOS token (one of ``extra_special``) the tokenizer adds to every text, as Gemma's and Llama's do.
    ``extra_marks``: named special tokens (e.g. Gemma 3's ``boi_token``), attributes of the tokenizer.
    """
    from tokenizers import Regex

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if qwen2_split
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[t for t in SPECIAL_TOKENS if image_token or t != "<image>"] + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS + extra_corpus] * 4, trainer)
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    marks = {"image_token": "<image>"} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        bos_token=bos,
        extra_special_tokens=marks | (extra_marks or {}),
        padding_side="left",
        chat_template=HUATUO_TEMPLATE,
    )


def text_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    """A tiny text config of the named family (qwen2, llama, mistral)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[family]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_llava(
    out_dir: str | Path,
    family: str = "qwen2",
    image_size: int = 112,
    patch_size: int = 14,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    pad_to_square: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny LLaVA-1.5-architecture checkpoint (CLIP vision, layer -2, mlp2x_gelu) with its processor."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = build_tokenizer()
    cfg = LlavaConfig(
        text_config=text_config(family, len(tok), hidden, layers, heads, kv_heads),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    out = save_random(LlavaForConditionalGeneration, cfg, tok, seed, out_dir)
    llava_processor(tok, image_size, patch_size, pad_to_square).save_pretrained(out)
    return out


def llava_processor(tok, image_size: int, patch_size: int, pad_to_square: bool):
    """A LLaVA processor; ``pad_to_square`` reproduces LLaVA-1.5's expand2square (mean-colour padding)."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        do_pad=pad_to_square,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=HUATUO_TEMPLATE,
    )


QWEN_VL_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_qwen2_vl(
    out_dir: str | Path,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    seed: int = 0,
    kind: str = "qwen2_vl",
    max_pixels: int | None = None,
) -> Path:
    """Save a tiny Qwen2-VL, Qwen2.5-VL (Lingshu's architecture) or Qwen3-VL checkpoint with its image processor.

    Dynamic resolution with a 2x2 merge; patches of 14 pixels (Qwen2/2.5-VL) or 16 (Qwen3-VL), as published.
    """
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if kind not in QWEN_VL_KINDS:
        raise ValueError(f"kind={kind!r}: one of {QWEN_VL_KINDS}")
    tok = build_tokenizer(extra_special=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
    # Qwen's layout: list content with an image part; a plain string means one image first (as the engine tests write it)
    tok.chat_template = (
        "{% for message in messages %}<|user|>\n{% if message['content'] is string %}"
        "<|vision_start|><|image_pad|><|vision_end|>{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n<|assistant|>\n{% endfor %}"
    )
    tc = text_config("qwen2", len(tok), hidden, layers, heads, kv_heads).to_dict()
    half = hidden // heads // 2  # M-RoPE splits each head's rotary half into (time, height, width) as 2:3:3, Qwen's 16:24:24
    tc["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
    patch = 16 if kind == "qwen3_vl" else 14
    vision = {"depth": 2, "hidden_size": hidden, "num_heads": 2, "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if kind == "qwen2_vl":
        vision["embed_dim"] = 32
    elif kind == "qwen2_5_vl":
        vision = {**vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden, "window_size": 56}
        vision["fullatt_block_indexes"] = [1]
    else:  # Qwen3-VL: learned position grid, DeepStack features from a middle block into the first text layers
        vision = {**vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden}
        vision |= {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        tc |= {"head_dim": hidden // heads, "model_type": "qwen3_vl_text"}
        tc["rope_parameters"]["mrope_interleaved"] = True
    config_class, model_class = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    }[kind]
    cfg = getattr(transformers, config_class)(
        text_config=tc,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    out = save_random(getattr(transformers, model_class), cfg, tok, seed, out_dir)
    # the full processors need a video processor, which needs torchvision: save the two parts they wrap.
    factor = patch * 2
    Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=(2 * factor) ** 2, max_pixels=max_pixels or (4 * factor) ** 2).save_pretrained(
        out
    )
    tok.save_pretrained(out)
    return out


def save_random(model_class, config, tokenizer, seed: int, out_dir) -> Path:
    """A seeded random-weight model of ``model_class`` saved (safetensors) to ``out_dir``, generating with the tokenizer's pad and eos."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
