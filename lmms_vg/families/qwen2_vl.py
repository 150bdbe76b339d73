"""The Qwen2-VL family: Qwen2-VL, Qwen2.5-VL (HuatuoGPT-Vision-7B-Qwen2.5VL, Lingshu) and Qwen3-VL, whole in one module.

The same prompt layout and dynamic-resolution geometry (patch 14, or 16 for Qwen3-VL, read from the
processor) and M-RoPE positions; the checkpoints load with transformers' own classes and templates.
Images are prepared as Qwen's utilities prepare them (``qwen_vl_utils.fetch_image``, then the
processor), boxes mapped through both resizes (README "VGMED: the authors' pipeline").
"""

from __future__ import annotations

import torch
from PIL import Image

from .. import geometry, internals, settings
from ..adapters import (
    BaseAdapter,
    adopt_tokenizer,
    image_lists,
    left_padded,
    prepare_image,
    prompt_chunks,
    take_over_padding,
    with_images,
)
from ..presets import Family, ModelPreset, register_family, register_preset


class Qwen2VLAdapter(BaseAdapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: dynamic resolution, one ``<|image_pad|>`` per merged 2x2 patch block.

    Its multimodal RoPE gives the text after the image positions shifted by the image grid; the
    image prefix is still shared (``shares_prefix``): the prefix pass computes the shift, and the
    suffix passes and generation add it (:func:`lmms_vg.passes.run_prefix`), so every token keeps
    the position it has in the whole prompt.
    """

    positions_by_index = False  # M-RoPE: 3-D positions laid out by the image grid
    cell_order = None  # merged 2 x 2 blocks in row-major order
    tokenisation = "whole"  # Qwen's processor tokenises the whole prompt
    fixed_grid = False  # dynamic resolution: ViCrop's high_res tiling is not defined for it (nor in its code)
    vicrop_defaults = (22, 224)  # ViCrop's published layer and crop size for Qwen2.5-VL

    @classmethod
    def take_options(cls, args: dict) -> tuple[dict, dict]:
        """``min_pixels``, ``max_pixels``: the processor's pixel budget (its ``from_pretrained`` keywords, as Qwen's model cards
        pass them); ``fetch_image``: qwen_vl_utils' first resize (default true)."""
        processor = {k: settings.as_int(k, args.pop(k), minimum=1) for k in ("min_pixels", "max_pixels") if args.get(k) is not None}
        args.pop("min_pixels", None), args.pop("max_pixels", None)
        fetch = args.pop("fetch_image", None)
        return processor, ({"fetch": settings.as_bool("fetch_image", fetch)} if fetch is not None else {})

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="whole", fetch=True):
        """``fetch``: prepare each image with ``qwen_vl_utils.fetch_image``'s resize before the processor's (Qwen's own usage,
        and the authors'); False: the processor's resize of the original only."""
        if tokenisation != "whole":
            raise ValueError(f"{name}: the Qwen2-VL family tokenises the whole prompt (its processor's way), not {tokenisation!r}")
        self.fetch = fetch
        self.model = model
        self.processor, self.pad_to_square = take_over_padding(processor, pad_to_square)
        self.tokenizer = adopt_tokenizer(processor.tokenizer, chat_template, name)
        self.image_processor = self.processor.image_processor
        self.name = name
        self.image_token_id = model.config.image_token_id
        self.merge = self.image_processor.merge_size

    @property
    def shares_prefix(self) -> bool:
        """Where the model keeps M-RoPE's shift for the text after the image (``rope_deltas``); else full prompts."""
        return internals.of(self.model).rope_deltas

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat template with one image placeholder (vision start, image pad, vision end) per image before the text."""
        message = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's ids around its image pads (each vision block's start before, its end after)."""
        pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return prompt_chunks(self.tokenizer, self.prompt(text, n_images), pad, self.image_token_id, "whole")

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt without its vision block (start, pads, end): the text before it and after it, as PAI builds its prompt."""
        before, after = self.chunks(text)
        start, end = self.model.config.vision_start_token_id, self.model.config.vision_end_token_id
        return (before[:-1] if before[-1:] == [start] else before) + (after[1:] if after[:1] == [end] else after)

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The token types M-RoPE needs to lay out the image's 3-D positions."""
        return {"mm_token_type_ids": (prefix_ids == self.image_token_id).long()}

    def image_tokens(self, image: Image.Image) -> int:
        t = self.transform(image)
        return t.rows * t.cols

    def model_image(self, image: Image.Image) -> Image.Image:
        """The image as the processor receives it: 8-bit RGB (transparency over white, as qwen_vl_utils' ``to_rgb``), padded
        to square only when asked, then resized as ``qwen_vl_utils.fetch_image`` does (PIL's default filter, as it calls it)."""
        image = prepare_image(image, self.image_processor, self.pad_to_square, background=(255, 255, 255))
        if not self.fetch:
            return image
        size = geometry.qwen_fetch_size(image.width, image.height, self.image_processor.patch_size * self.merge)
        return image if size == image.size else image.resize(size)

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=[self.model_image(img) for img in images], return_tensors="pt")
        return {
            "pixel_values": out["pixel_values"].to(self.device, self.model.dtype),
            "image_grid_thw": out["image_grid_thw"].to(self.device),
        }

    def encode(self, images: list[Image.Image | list[Image.Image]], texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch (one image, or a list per prompt); each pad expanded to its image's token count (needs no torchvision)."""
        per_prompt = image_lists(images)
        pixels = self.pixel_inputs([img for imgs in per_prompt for img in imgs])
        counts = iter((pixels["image_grid_thw"].prod(-1) // self.merge**2).tolist())
        rows = [
            with_images(self.chunks(t, len(imgs)), self.image_token_id, [int(next(counts)) for _ in imgs])
            for t, imgs in zip(texts, per_prompt)
        ]
        batch = left_padded(rows, self.tokenizer.pad_token_id, self.device)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return {**batch, **pixels}

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        ip = self.image_processor
        min_pixels = ip.min_pixels if getattr(ip, "min_pixels", None) else ip.size["shortest_edge"]
        max_pixels = ip.max_pixels if getattr(ip, "max_pixels", None) else ip.size["longest_edge"]
        return geometry.qwen2_vl_transform(
            image.width,
            image.height,
            patch=ip.patch_size,
            merge=self.merge,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            pad_to_square=self.pad_to_square,
            fetch=self.fetch,
        )


def tiny(folder, seed: int = 0, kind: str = "qwen2_5_vl"):
    """A tiny random Qwen2.5-VL (or ``kind``: qwen2_vl, qwen3_vl) with its tokenizer and image processor."""
    from ..demo import tiny as builders

    return builders.build_qwen2_vl(folder, seed=seed, kind=kind)


register_family(
    Family(
        "qwen2_vl",
        Qwen2VLAdapter,
        {
            "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration",
        },
        options=("min_pixels", "max_pixels", "fetch_image"),
        label="Qwen2-VL-family",
        tiny=tiny,
    )
)
register_preset(
    ModelPreset(
        model_id="huatuo_qwen25vl",
        checkpoint="FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL",
        chat_template=None,
        pad_to_square=False,
        note="calibrate heads",
        family="qwen2_vl",
    ),
    ModelPreset(
        model_id="qwen25vl",
        checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",
        chat_template=None,
        pad_to_square=False,
        note="general-domain reference; calibrate heads",
        family="qwen2_vl",
    ),
    # the authors' current grounding code also runs these two (its Qwen backends)
    ModelPreset(
        model_id="lingshu",
        checkpoint="lingshu-medical-mllm/Lingshu-7B",
        chat_template=None,
        pad_to_square=False,
        note="medical Qwen2.5-VL; calibrate heads",
        family="qwen2_vl",
    ),
    ModelPreset(
        model_id="qwen3vl",
        checkpoint="Qwen/Qwen3-VL-8B-Instruct",
        chat_template=None,
        pad_to_square=False,
        note="general-domain Qwen3-VL; calibrate heads",
        family="qwen2_vl",
    ),
)
