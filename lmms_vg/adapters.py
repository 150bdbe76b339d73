"""What the core needs to know of a model family: prompts, encoding, image geometry.

An adapter turns (image, text) pairs into model inputs and says where the image tokens are and
how an image's pixels reach its token grid. The LLaVA adapter serves every
``LlavaForConditionalGeneration`` checkpoint (HuatuoGPT-Vision, LLaVA-Med, LLaVA-1.5 -hf).

A prompt is tokenised as the model's original code tokenises it (:func:`prompt_chunks`): the text
between the image placeholders, chunk by chunk or whole, with or without the tokenizer's special
tokens. With a tokenizer that adds BOS or a SentencePiece dummy prefix, the three ways give
different ids, and a model sees what it was trained and evaluated with only through its own way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from . import geometry, internals
from .engine import EngineError


class Adapter(Protocol):
    """What a model family tells the core (:mod:`lmms_vg.passes`, grounding, VGRefine); the classes below are the implementations.

    A new family implements these, with a ``Family`` record naming it (README 'Adding a model').
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_token_id: int
    shares_prefix: bool  # one image prefix serves every prompt (False: its text positions depend on the image)
    positions_by_index: bool  # a token's position is its index (1-D RoPE): texts may ride on the prefix's pass with given positions
    cell_order: list[int] | None  # image tokens -> row-major cells, where the model orders them otherwise

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat-formatted prompt, with the image placeholders."""

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's token ids around its image placeholders, tokenised as the model's original code does."""

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt without its image (PAI's text-only run)."""

    def encode(self, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
        """A left-padded batch of full prompts with their images."""

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The model's image inputs for one image per prompt."""

    def split_prompts(self, images: list[Image.Image], texts: list[str]) -> Prompts:
        """Token ids split after the image tokens (needed where ``shares_prefix``)."""

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model needs beside the ids and pixels to run an image prefix alone (Qwen2-VL: the token types)."""

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        """How the image's pixels reach its token grid."""


# How the original code turns a prompt into ids (what :func:`prompt_chunks` follows):
TOKENISATIONS = {
    # LLaVA's tokenizer_image_token (haotian-liu/LLaVA llava/mm_utils.py; LLaVA-Med, MedTrinity, VILA copy it):
    # each chunk between placeholders with the tokenizer's special tokens, the BOS kept on the first only
    "llava": "chunks, special tokens, one BOS",
    # HuatuoGPT-Vision's cli.py (its own tokenizer_image_token): each chunk without special tokens (no BOS)
    "huatuo": "chunks, no special tokens",
    # InternVL's chat(), Qwen's processor, transformers' LLaVA processor: the whole prompt, special tokens as the tokenizer adds
    "whole": "the whole prompt",
}


def prompt_chunks(tokenizer, prompt: str, placeholder: str, image_token_id: int, style: str) -> list[list[int]]:
    """Token ids of the text around the image placeholders (one chunk more than placeholders), as ``style`` tokenises.

    ``placeholder`` is the text that stands for an image in ``prompt``; ``image_token_id`` the token
    it becomes (for ``whole``, the prompt is tokenised as it is and cut at that token).
    """
    if style == "whole":
        ids = tokenizer(prompt)["input_ids"]
        chunks: list[list[int]] = [[]]
        for token in ids:
            if token == image_token_id:
                chunks.append([])
            else:
                chunks[-1].append(token)
        return chunks
    if style not in TOKENISATIONS:
        raise ValueError(f"tokenisation {style!r} is not one of {sorted(TOKENISATIONS)}")
    chunks = [tokenizer(piece, add_special_tokens=style == "llava")["input_ids"] for piece in prompt.split(placeholder)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if style == "llava" and bos is not None and chunks[0][:1] == [bos]:  # its `offset`: later chunks lose their first token
        chunks = [chunks[0]] + [c[1:] for c in chunks[1:]]
    return chunks


def with_images(chunks: list[list[int]], image_token_id: int, counts: list[int]) -> list[int]:
    """The prompt's ids: its chunks with ``counts[i]`` image tokens between chunk i and chunk i+1."""
    if len(chunks) != len(counts) + 1:
        raise EngineError(f"the prompt holds {len(chunks) - 1} image placeholder(s) for {len(counts)} image(s)")
    ids = list(chunks[0])
    for count, chunk in zip(counts, chunks[1:]):
        ids += [image_token_id] * count + chunk
    return ids


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` of the rows, left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@dataclass
class Prompts:
    """Token ids of each prompt split after its image tokens: ``prefix[i] + suffix[i]`` is prompt i."""

    prefix: list[list[int]]
    suffix: list[list[int]]


class LlavaAdapter:
    """LLaVA-1.5 family: one ``<image>`` placeholder expanded by the processor to a fixed token grid.

    ``pad_to_square``: pad each image to a square with the processor's mean colour before the
    processor sees it (LLaVA-1.5's ``expand2square``), whatever processor class the checkpoint
    ships (a ``CLIPImageProcessor`` ignores ``do_pad``); None keeps the processor's own ``do_pad``.
    """

    shares_prefix = True  # the image tokens' positions do not depend on the text: one prefix serves every prompt
    positions_by_index = True
    cell_order: list[int] | None = None  # image tokens in row-major cell order already (see VilaAdapter)
    placeholder = "<image>"  # what stands for an image in the prompt text

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
        self.tokenizer = processor.tokenizer
        self.name = name
        if chat_template:
            self.tokenizer.chat_template = chat_template
        if not self.tokenizer.chat_template:
            raise EngineError(f"{name}: the tokenizer has no chat template; give one in the model preset or chat_template=")
        if getattr(self.processor, "patch_size", None) is None:  # some -hf conversions ship without it
            self.processor.patch_size = model.config.vision_config.patch_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.image_token_id = model.config.image_token_id
        self._n_image_tokens: int | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat-formatted prompt with one image placeholder per image before the text (the LLaVA codebase's order)."""
        message = [{"role": "user", "content": "<image>\n" * n_images + text}]
        return self.tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's ids around its image placeholders, tokenised as the original code does (:func:`prompt_chunks`)."""
        return prompt_chunks(self.tokenizer, self.prompt(text, n_images), self.placeholder, self.image_token_id, self.tokenisation)

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt without its image: the text before it and the text after it, each tokenised as in the full prompt
        (PAI's text-only prompt: its ``init_cfg_processor`` tokenises the two sides apart, BOS first)."""
        return [token for chunk in self.chunks(text) for token in chunk]

    def model_image(self, image: Image.Image) -> Image.Image:
        """The image as the processor receives it: 8-bit RGB, padded to square where the model pads."""
        return prepare_image(image, self.processor.image_processor, self.pad_to_square)

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pixels = self.processor.image_processor(images=[self.model_image(img) for img in images], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, self.model.dtype)}

    def encode(self, images: list[Image.Image | list[Image.Image]], texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded batch of full prompts with their images (one, or a list per prompt for multi-image items)."""
        per_prompt = image_lists(images)
        rows = [
            with_images(self.chunks(text, len(imgs)), self.image_token_id, [self.image_tokens(img) for img in imgs])
            for text, imgs in zip(texts, per_prompt)
        ]
        batch = left_padded(rows, self.tokenizer.pad_token_id, self.device)
        return {**batch, **self.pixel_inputs([img for imgs in per_prompt for img in imgs])}

    def split_prompts(self, images: list[Image.Image], texts: list[str]) -> Prompts:
        return split_after_image(self, images, texts)

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

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
        from .vila import MERGE, cell_order

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


def split_after_image(adapter, images: list[Image.Image], texts: list[str]) -> Prompts:
    """Each prompt's ids (text only: no second pass over the pixels) split after its image tokens.

    The same ids as :meth:`encode` gives, BOS and all: the shared prefix is the full prompt's
    beginning, token for token.
    """
    prefix, suffix = [], []
    for image, text in zip(images, texts):
        chunks = adapter.chunks(text)
        if len(chunks) != 2:
            raise EngineError(f"{adapter.name}: the prompt must hold exactly one image placeholder, found {len(chunks) - 1}")
        prefix.append(chunks[0] + [adapter.image_token_id] * adapter.image_tokens(image))
        suffix.append(chunks[1])
    return Prompts(prefix, suffix)


def image_lists(images: list) -> list[list[Image.Image]]:
    """Each prompt's images as a list: a single image becomes a list of one."""
    return [[item] if isinstance(item, Image.Image) else list(item) for item in images]


def take_over_padding(processor, pad_to_square: bool | None) -> tuple[object, bool]:
    """A copy of ``processor`` whose image processor never pads, and whether images are padded to square.

    Padding is the asked setting, else the processor's own ``do_pad``; :func:`prepare_image` then
    does it, so it happens for real whatever the processor class, and exactly once. The caller's
    processor is left as it was.
    """
    image_processor = processor.image_processor
    pad = bool(getattr(image_processor, "do_pad", False)) if pad_to_square is None else bool(pad_to_square)
    own = copy.copy(processor)
    own.image_processor = copy.deepcopy(image_processor)
    if hasattr(own.image_processor, "do_pad"):
        own.image_processor.do_pad = False
    return own, pad


def prepare_image(image: Image.Image, image_processor, pad_to_square: bool, background=(0, 0, 0)) -> Image.Image:
    """8-bit RGB (transparency over ``background``); with ``pad_to_square``, centred on a max-side square of the
    processor's mean colour (LLaVA's expand2square)."""
    image = rgb(image, background)
    if not pad_to_square or image.width == image.height:
        return image
    side = max(image.size)
    colour = tuple(int(x * 255) for x in (getattr(image_processor, "image_mean", None) or (0.0, 0.0, 0.0)))
    square = Image.new("RGB", (side, side), colour)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def rgb(image: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F) as 8-bit RGB; 16-bit and float images are rescaled to 0..255, transparent
    pixels laid over ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype("uint8")).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        canvas = Image.new("RGB", image.size, background)
        rgba = image.convert("RGBA")
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


class Qwen2VLAdapter:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: dynamic resolution, one ``<|image_pad|>`` per merged 2x2 patch block.

    Its multimodal RoPE gives the text after the image positions shifted by the image grid; the
    image prefix is still shared (``shares_prefix``): the prefix pass computes the shift, and the
    suffix passes and generation add it (:func:`lmms_vg.passes.run_prefix`), so every token keeps
    the position it has in the whole prompt.
    """

    positions_by_index = False  # M-RoPE: 3-D positions laid out by the image grid
    cell_order = None  # merged 2 x 2 blocks in row-major order
    tokenisation = "whole"  # Qwen's processor tokenises the whole prompt

    def __init__(self, model, processor, chat_template=None, name="model", pad_to_square=None, tokenisation="whole", fetch=True):
        """``fetch``: prepare each image with ``qwen_vl_utils.fetch_image``'s resize before the processor's (Qwen's own usage,
        and the authors'); False: the processor's resize of the original only."""
        if tokenisation != "whole":
            raise ValueError(f"{name}: the Qwen2-VL family tokenises the whole prompt (its processor's way), not {tokenisation!r}")
        self.fetch = fetch
        self.model = model
        self.processor, self.pad_to_square = take_over_padding(processor, pad_to_square)
        self.tokenizer = processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.name = name
        if chat_template:
            self.tokenizer.chat_template = chat_template
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.image_token_id = model.config.image_token_id
        self.merge = self.image_processor.merge_size

    @property
    def device(self) -> torch.device:
        return self.model.device

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

    def split_prompts(self, images: list[Image.Image], texts: list[str]) -> Prompts:
        return split_after_image(self, images, texts)

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
