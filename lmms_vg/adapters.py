"""What the core needs to know of a model family: prompts, encoding, image geometry.

An adapter turns (image, text) pairs into model inputs and says where the image tokens are and
how an image's pixels reach its token grid. :class:`Adapter` is the whole contract; each family's
adapter (:mod:`lmms_vg.families`) implements it, with what they share written once here: how a
prompt is tokenised around its image placeholders, left padding, the one image conversion.

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

from . import geometry
from .engine import EngineError


class Adapter(Protocol):
    """What a model family tells the core (:mod:`lmms_vg.passes`, grounding, the methods): the whole contract.

    A family's module implements it (see :mod:`lmms_vg.families.gemma3`, the worked example), and
    ``lmms-vg check-family`` holds an implementation to the model's own processor and eager attention.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    image_token_id: int
    tokenisation: str  # how the model's original code tokenises a prompt (TOKENISATIONS)
    shares_prefix: bool  # one image prefix serves every prompt (False: full prompts, e.g. M-RoPE without its shift)
    positions_by_index: bool  # a token's position is its index (1-D RoPE): texts may ride on the prefix's pass with given positions
    cell_order: list[int] | None  # image tokens -> row-major cells, where the model orders them otherwise
    fixed_grid: bool  # every image becomes the same token grid (ViCrop's high_res tiling needs it)
    vicrop_defaults: tuple[int, int]  # ViCrop's published (layer, crop size) for this kind of model

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go."""

    @classmethod
    def take_options(cls, args: dict) -> tuple[dict, dict]:
        """The family's own ``--model_args`` (taken out of ``args``): keywords for the processor's ``from_pretrained`` and for the adapter."""

    def prompt(self, text: str, n_images: int = 1) -> str:
        """The chat-formatted prompt, with the image placeholders; BOS only where the template writes it (the tokenisation adds the tokenizer's)."""

    def chunks(self, text: str, n_images: int = 1) -> list[list[int]]:
        """The prompt's token ids around its image placeholders, tokenised as the model's original code does."""

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt without its image (PAI's text-only run)."""

    def encode(self, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
        """A left-padded batch of full prompts with their images, every input the model needs (its token types, grids...)."""

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The model's image inputs for one image per prompt."""

    def image_tokens(self, image: Image.Image) -> int:
        """How many tokens one image becomes."""

    def split_prompts(self, images: list[Image.Image], texts: list[str]) -> Prompts:
        """Token ids split after the image tokens (needed where ``shares_prefix``)."""

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model needs beside the ids and pixels to run an image prefix alone (Qwen2-VL, Gemma3: the token types)."""

    def transform(self, image: Image.Image) -> geometry.ImageTransform:
        """How the image's pixels reach its token grid."""


class BaseAdapter:
    """What adapters share: the model's device, its sliding window, the text-only prompt, and no options of their own unless
    the family takes some."""

    fixed_grid = True
    vicrop_defaults: tuple[int | None, int] = (14, 0)  # LLaVA-1.5's layer; crop size 0: the model's input size
    placeholder = "<image>"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def window(self) -> int | None:
        """The text layers' sliding window where some layer has one (Gemma 3: 5 of every 6), else None."""
        return sliding_window(self.model)

    @classmethod
    def take_options(cls, args: dict) -> tuple[dict, dict]:
        return {}, {}

    def text_only_ids(self, text: str) -> list[int]:
        """The prompt without its image: the text before it and the text after it, each tokenised as in the full prompt
        (PAI's text-only prompt: its ``init_cfg_processor`` tokenises the two sides apart, BOS first)."""
        return [token for chunk in self.chunks(text) for token in chunk]

    def model_image(self, image: Image.Image) -> Image.Image:
        """The image as the processor receives it: 8-bit RGB, padded to square where the model pads (``pad_to_square``)."""
        return prepare_image(image, self.processor.image_processor, self.pad_to_square)

    def pixel_inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The image processor's pixels of the prepared images (one tensor for a fixed-size input)."""
        pixels = self.processor.image_processor(images=[self.model_image(img) for img in images], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels.to(self.device, self.model.dtype)}

    def encode(self, images: list[Image.Image | list[Image.Image]], texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded full prompts (one image, or a list per prompt), the per-token inputs of :meth:`prefix_inputs` over
        the whole rows, and the pixels."""
        per_prompt = image_lists(images)
        rows = [
            with_images(self.chunks(text, len(imgs)), self.image_token_id, [self.image_tokens(img) for img in imgs])
            for text, imgs in zip(texts, per_prompt)
        ]
        batch = left_padded(rows, self.tokenizer.pad_token_id, self.device)
        batch.update(self.prefix_inputs(batch["input_ids"]))
        return {**batch, **self.pixel_inputs([img for imgs in per_prompt for img in imgs])}

    def split_prompts(self, images: list[Image.Image], texts: list[str]) -> Prompts:
        return split_after_image(self, images, texts)

    def prefix_inputs(self, prefix_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


def sliding_window(model) -> int | None:
    """The smallest number of positions a text layer attends back over, where any layer slides (transformers' ``layer_types``;
    a config without them slides every layer where it sets ``sliding_window``); None where every layer sees the whole prompt."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if types is None and getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def adopt_tokenizer(tokenizer, chat_template: str | None, name: str):
    """The model's tokenizer with ``chat_template`` (None: its own, which it must have), a pad token and left padding."""
    if chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise EngineError(f"{name}: the tokenizer has no chat template; give one in the model preset or chat_template=")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# How the original code turns a prompt into ids (what :func:`prompt_chunks` follows):
TOKENISATIONS = {
    # LLaVA's tokenizer_image_token (haotian-liu/LLaVA llava/mm_utils.py; LLaVA-Med, MedTrinity, VILA copy it):
    # each chunk between placeholders with the tokenizer's special tokens, the BOS kept on the first only
    "llava": "chunks, special tokens, one BOS",
    # HuatuoGPT-Vision's cli.py (its own tokenizer_image_token): each chunk without special tokens (no BOS)
    "huatuo": "chunks, no special tokens",
    # InternVL's chat(), Qwen's processor, transformers' LLaVA processor, a processor's apply_chat_template: the whole prompt,
    # with the tokenizer's special tokens unless the template already wrote its BOS (Gemma 3's; transformers'
    # ProcessorMixin.apply_chat_template then tokenises without them, so the BOS is not doubled)
    "whole": "the whole prompt",
}


def prompt_chunks(tokenizer, prompt: str, placeholder: str, image_token_id: int, style: str) -> list[list[int]]:
    """Token ids of the text around the image placeholders (one chunk more than placeholders), as ``style`` tokenises.

    ``placeholder`` is the text that stands for an image in ``prompt``; ``image_token_id`` the token
    it becomes (for ``whole``, the prompt is tokenised as it is and cut at that token).
    """
    if style == "whole":
        ids = tokenizer(prompt, add_special_tokens=not starts_with_bos(tokenizer, prompt))["input_ids"]
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


def starts_with_bos(tokenizer, prompt: str) -> bool:
    """Whether the chat template wrote the tokenizer's BOS at the prompt's start (it must not be added twice)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and prompt.startswith(bos)


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
