"""Gemma 3 (MedGemma): the worked example of adding a family (README "Adding a model").

google/medgemma-4b-it is transformers' ``Gemma3ForConditionalGeneration``: a SigLIP tower at 896 px
whose 64 x 64 patches are average-pooled 4 x 4 into 256 tokens, and a Gemma 3 text model. Four things
set it apart from LLaVA, and the adapter below says each once:

- **BOS**: Gemma's chat template writes ``<bos>`` and its tokenizer would add another; the prompt is
  tokenised whole without the tokenizer's special tokens, as the processor's ``apply_chat_template``
  does (``adapters.prompt_chunks``, style ``whole``);
- **the image**: the template writes ``<start_of_image>``; the processor replaces it by
  ``"\\n\\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\\n\\n"``, tokenised with the
  text around it (the newlines merge with their neighbours), and so does :meth:`Gemma3Adapter.chunks`;
- **token types**: the image's tokens attend to each other both ways, through a mask built from
  ``token_type_ids`` (1 on the soft tokens); leaving them out silently gives causal maps
  (:meth:`Gemma3Adapter.prefix_inputs`, :meth:`Gemma3Adapter.encode`);
- **sliding windows**: five of every six text layers see the last 1024 positions only;
  :attr:`~lmms_vg.adapters.BaseAdapter.window` reads it from the config, and the passes share the
  image prefix only while a pass stays inside it (full prompts beyond).

The preset asks as Gemma 3's model card does (the image, then the text, in one user turn, no system
turn); ``lmms-vg check-family medgemma`` holds the adapter to the processor and to eager attention.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .. import geometry
from ..adapters import (
    BaseAdapter,
    adopt_tokenizer,
    prompt_chunks,
    take_over_padding,
)
from ..presets import Family, ModelPreset, register_family, register_preset


class Gemma3Adapter(BaseAdapter):
    """Gemma 3: a fixed square input, ``mm_tokens_per_image`` pooled tokens in row-major order between BOI and EOI."""

    shares_prefix = True  # the image tokens' positions do not depend on the text (1-D RoPE)
    positions_by_index = True
    cell_order = None  # pooled patches, row-major
    vicrop_defaults = (None, 0)  # ViCrop publishes no layer for Gemma 3: give layer=; crop size: the input size

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="whole"):
        if tokenisation != "whole":
            raise ValueError(f"{name}: Gemma 3's processor tokenises the whole prompt, not {tokenisation!r}")
        self.model, self.name, self.tokenisation = model, name, tokenisation
        self.processor, self.pad_to_square = take_over_padding(processor, pad_to_square)
        self.tokenizer = adopt_tokenizer(processor.tokenizer, chat_template, name)
        self.image_token_id = model.config.image_token_id  # the soft token the features replace
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.boi = self.tokenizer.convert_ids_to_tokens(model.config.boi_token_id)
        self.eoi = self.tokenizer.convert_ids_to_tokens(model.config.eoi_token_id)
        self.n_tokens = int(model.config.mm_tokens_per_image)
        self.size = int(self.processor.image_processor.size["height"])
        self.patch = int(model.config.vision_config.patch_size)
        self.pool = (self.size // self.patch) // int(self.n_tokens**0.5)  # patches a side per token (4 for MedGemma)

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat template over Gemma 3's message: the images, then the text, in one user turn."""
        message = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's ids around its soft tokens, each BOI expanded as the processor does (its newlines included)."""
        expanded = self.prompt(text, n_images).replace(self.boi, f"\n\n{self.boi}{self.image_token}{self.eoi}\n\n")
        return prompt_chunks(self.tokenizer, expanded, self.image_token, self.image_token_id, "whole")

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt the template writes without an image (PAI's text-only prompt)."""
        return prompt_chunks(self.tokenizer, self.prompt(text, n_images=0), self.image_token, self.image_token_id, "whole")[0]

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The token types Gemma 3's bidirectional image attention is built from (1 on the soft tokens, as the processor
        gives them; ``encode`` adds them over the whole rows). Images are squashed to the square input (padded only where
        asked): ``BaseAdapter.model_image``."""
        return {"token_type_ids": (prefix_ids == self.image_token_id).long()}

    def image_tokens(self, image: Image.Image) -> int:
        return self.n_tokens

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        """Resized to the square input whatever its shape; each token pools ``pool`` x ``pool`` patches."""
        return geometry.squash_transform(
            image.width, image.height, size=self.size, patch=self.patch, merge=self.pool, pad_to_square=self.pad_to_square
        )


# Gemma 3's chat template, as google/gemma-3-4b-it and google/medgemma-4b-it ship it (huggingface/transformers
# tests/models/gemma3/test_processing_gemma3.py @ 033522b carries the same text); checkpoints carry their own,
# this is for the tiny test model.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- set first_user_prefix = messages[0]['content'][0]['text'] + "
    "'\n\n' -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    "
    "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if (message['role'] == 'user') "
    '!= (loop.index0 % 2 == 0) -%}\n        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") '
    "}}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif "
    "message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim "
    '}}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def tiny(folder: str | Path, seed: int = 0, window: int = 512) -> Path:
    """A tiny random Gemma 3 with its processor: 112 px, 8 x 8 patches pooled 2 x 2 into 16 tokens; a sliding layer
    (``window`` positions) between two full ones."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..demo import tiny as builders

    marks = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = builders.build_tokenizer(
        extra_special=("<bos>", "<start_of_turn>", "<end_of_turn>", *marks.values()),
        image_token=False,
        bos="<bos>",
        extra_marks=marks,
        extra_corpus="user\nmodel\n\n\n\n",
    )
    tok.chat_template = GEMMA3_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in marks.items()}
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    out = builders.save_random(Gemma3ForConditionalGeneration, config, tok, seed, folder)
    image_processor = Gemma3ImageProcessorPil(size={"height": 112, "width": 112}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_TEMPLATE, image_seq_length=16).save_pretrained(out)
    return out


register_family(Family("gemma3", Gemma3Adapter, {"gemma3": "Gemma3ForConditionalGeneration"}, label="Gemma 3 family", tiny=tiny))
register_preset(
    ModelPreset(
        model_id="medgemma",
        checkpoint="google/medgemma-4b-it",
        note="MedGemma 4B (Gemma 3): no published heads, calibrate (README 'VGRefine'); a gated model: accept its terms on the Hub",
        family="gemma3",
    )
)
