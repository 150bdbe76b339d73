"""Checkpoints in their own codebases' layouts to transformers-native folders: ``lmms-vg convert``.

Each family converts its own layout (:mod:`lmms_vg.families`: the LLaVA codebase's, VILA's,
InternVL-Chat's) and registers a :class:`Converter`; :func:`convert` finds the one that recognises the
source and writes its folder (safetensors, config, tokenizer, processor) through a staging folder:
nothing half-written, nothing of the user's replaced without ``force``. What the converters share is
here: reading weights (safetensors first, PyTorch files weights-only), the LLaVA codebase's key map,
room for the ``<image>`` token, saving without a random init.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import writing

# original prefix -> LlavaForConditionalGeneration's (in-memory) prefix, most specific first (the tower is mapped apart)
KEY_MAP = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as given; the message says what is missing."""


@dataclass(frozen=True)
class Converter:
    """A family's converter: whether a source folder is its layout (``matches(source, its config)``), and the conversion
    (``convert(source, out, config, arch=..., vision_tower=...)`` writes into ``out``); lower ``priority`` is tried first."""

    name: str
    matches: Callable[[Path, dict], bool]
    convert: Callable[..., object]
    priority: int = 0


CONVERTERS: list[Converter] = []


def register_converter(converter: Converter) -> None:
    CONVERTERS[:] = sorted([c for c in CONVERTERS if c.name != converter.name] + [converter], key=lambda c: c.priority)


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
    from .presets import load_families

    source, target = Path(source).expanduser().resolve(), Path(out).expanduser().resolve()
    if not (source / "config.json").exists():
        raise ConversionError(f"{source} has no config.json: give the folder of an original LLaVA-format checkpoint")
    if target == source and not force:
        raise ConversionError(f"the output folder is the source ({source}): its config and weights would be replaced; give another folder")
    load_families()
    original = json.loads((source / "config.json").read_text())
    if arch:
        original = {**original, "model_type": arch}
    converter = next((c for c in CONVERTERS if c.matches(source, original)), None)
    if converter is None:
        known = sorted({c.name for c in CONVERTERS})
        raise ConversionError(
            f"model_type {original.get('model_type')!r}: no converter recognises {source} (known layouts: {', '.join(known)}); "
            "pass --arch if the config does not say"
        )
    with writing.staged(target, force, exclusive=True, what="lmms-vg convert") as stage:
        converter.convert(source, stage, original, arch=arch, vision_tower=vision_tower)
    return target
