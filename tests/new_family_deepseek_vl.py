"""A model family lmms-vg does not ship, added in one file as README "Adding a model" describes: DeepSeek-VL.

transformers' ``DeepseekVLForConditionalGeneration``: a SigLIP tower whose every patch is a token, an
MLP aligner, a Llama text model. Its processor resizes the longest side to the tower's size, pads to
square with the mean colour, and expands ``<image_placeholder>`` to the patch count. Nothing here is
LLaVA's: the adapter implements :class:`lmms_vg.adapters.Adapter` from :class:`~lmms_vg.adapters.BaseAdapter`
with the shared helpers, and ``tests/test_adding_a_model.py`` runs the conformance battery on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmms_vg import geometry
from lmms_vg.adapters import BaseAdapter, adopt_tokenizer, image_lists, left_padded, prompt_chunks, rgb, with_images
from lmms_vg.presets import Family, register_family

TEMPLATE = "{% for message in messages %}User: {{ message['content'] }}\n\nAssistant:{% endfor %}"


class DeepseekVLAdapter(BaseAdapter):
    shares_prefix = True  # 1-D RoPE and no token types: one image prefix serves every prompt
    positions_by_index = True
    cell_order = None  # patches in row-major order

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="whole"):
        self.model, self.processor, self.name, self.tokenisation = model, processor, name, tokenisation
        self.tokenizer = adopt_tokenizer(processor.tokenizer, chat_template, name)
        self.image_token_id = model.config.image_token_id
        self.placeholder = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.size = int(processor.image_processor.size["height"])
        self.patch = int(model.config.vision_config.patch_size)

    def prompt(self, text: str, n_images: int = 1) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.placeholder * n_images + text}], tokenize=False, add_generation_prompt=True
        )

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        return prompt_chunks(self.tokenizer, self.prompt(text, n_images), self.placeholder, self.image_token_id, "whole")

    def model_image(self, image):
        return rgb(image)

    def pixel_inputs(self, images) -> dict[str, torch.Tensor]:
        pixels = self.processor.image_processor(images=[self.model_image(i) for i in images], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, self.model.dtype)}

    def encode(self, images, texts) -> dict[str, torch.Tensor]:
        per_prompt = image_lists(images)
        rows = [
            with_images(self.chunks(t, len(i)), self.image_token_id, [self.image_tokens(x) for x in i]) for t, i in zip(texts, per_prompt)
        ]
        batch = left_padded(rows, self.tokenizer.pad_token_id, self.device)
        return {**batch, **self.pixel_inputs([x for i in per_prompt for x in i])}

    def image_tokens(self, image) -> int:
        return (self.size // self.patch) ** 2

    def transform(self, image) -> geometry.ImageTransform:
        """The longest side resized to the input size (rounded as the processor rounds), then centred on a square."""
        scale = self.size / max(image.width, image.height)
        new_w, new_h = max(round(image.width * scale), 14), max(round(image.height * scale), 14)
        side = self.size // self.patch
        return geometry.ImageTransform(
            new_w / image.width,
            new_h / image.height,
            (self.size - new_w) // 2,
            (self.size - new_h) // 2,
            side,
            side,
            float(self.patch),
            image.width,
            image.height,
        )


def tiny(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random DeepSeek-VL: SigLIP at 64 px, 4 x 4 patches of 16 px, a Llama text model."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor, SiglipVisionConfig
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    from lmms_vg.demo import tiny as builders

    tok = builders.build_tokenizer(
        image_token=False, extra_special=("<image_placeholder>",), extra_marks={"image_token": "<image_placeholder>"}
    )
    tok.chat_template = TEMPLATE
    config = DeepseekVLConfig(
        text_config=builders.text_config("llama", len(tok)).to_dict(),
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
        ).to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    out = builders.save_random(DeepseekVLForConditionalGeneration, config, tok, seed, folder)
    image_processor = DeepseekVLImageProcessorPil(size={"height": 64, "width": 64})
    DeepseekVLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE, num_image_tokens=16).save_pretrained(out)
    return out


register_family(
    Family("deepseek_vl", DeepseekVLAdapter, {"deepseek_vl": "DeepseekVLForConditionalGeneration"}, label="DeepSeek-VL", tiny=tiny)
)
