"""What every inference-time method is to the rest of lmms-vg: one interface.

A :class:`Method` has its settings (a frozen dataclass: its fields are the ``--model_args`` it takes,
parsed strictly before the checkpoint loads, then checked against the loaded model before any sample),
how it answers a batch, and what it does to grounding (a steer on the attention, a knockout, or nothing
when it changes the input instead). A method is one module registered with :func:`register`; the
wrapper takes it by name and knows nothing else of it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from .. import engine, settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image


class MethodConfigError(ValueError):
    """A method setting that cannot work; raised before any sample runs."""


@dataclass(frozen=True)
class Steering:
    """A method's steer for a batch of samples, before a pass's layout is known: its kind, layers, one value per sample."""

    kind: engine.SteerKind
    layers: frozenset[int]
    values: torch.Tensor  # [B]
    steps: engine.SteerSteps

    def plan(self, cols: torch.Tensor, repeats: int = 1) -> engine.Steer:
        """The engine's steer for a pass whose rows are each sample ``repeats`` times in a row, image tokens at ``cols``."""
        return engine.Steer(self.layers, cols, self.kind, self.values.repeat_interleave(repeats), self.steps)


def image_steer(batch: dict, image_token_id: int, steering: Steering) -> engine.Steer:
    """The steer on the image tokens of an encoded batch."""
    return steering.plan((batch["input_ids"] == image_token_id).cpu())


class KnockoutPlan(Protocol):
    """What grounding needs of a method that knocks patches out (VGRefine's config is one)."""

    knockout_layers: tuple[int, ...]
    mode: str

    @property
    def map_layers(self) -> frozenset[int] | None: ...

    def keep(self, question: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[B, N]``: the patches kept, from the question maps and the reference maps ``[B, L, H, N]``."""


@dataclass(frozen=True)
class GroundingPlan:
    """What a method does to grounding: a steer for each batch's passes, a knockout, or nothing (its grounding is the model's own)."""

    steering: Callable[[list, list[str]], Steering] | None = None  # (images, questions) -> the batch's steer
    knockout: KnockoutPlan | None = None


@dataclass(frozen=True)
class Asked:
    """A batch a method answers: per sample its images, the task's prompt, and what the task names for it."""

    images: list[list[Image.Image]]
    texts: list[str]
    image_keys: list[str | None]  # for the per-image reference cache
    short_questions: list[str]  # the bare question with the short-answer instruction (ViCrop's attention passes)
    reference_prompt: str | None = None  # the task's generic prompt (None: the method's own)


@dataclass
class MethodOutcome:
    tokens: torch.Tensor  # [B, new]
    first_logits: torch.Tensor | None  # [B, vocab] with output_logits=True
    details: list[dict]  # per sample: what the method did (AdaptVis's confidence and weight, ViCrop's box...)
    answer_fields: list[dict] = field(default_factory=list)  # per sample: Answer fields beside ``method`` (VGRefine's knockout)


PARSERS = {int: settings.as_int, float: settings.as_float, bool: settings.as_bool}


def _value_type(hint: Any) -> Any:
    """The type a setting given as text is parsed to: ``int`` for ``int`` and for ``int | None``."""
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    return options[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1 else hint


def parse_settings(cls: type, args: dict, method: str) -> Any:
    """``cls`` (a settings dataclass) from ``--model_args`` values, each parsed by its field's type; unknown names are an error."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise MethodConfigError(f"{method}: unknown settings {unknown}; it takes {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in args.items():
        if value is None:
            continue
        parse = PARSERS.get(_value_type(hints[name]))
        values[name] = parse(name, value) if parse else value
    return cls(**values)


class Method:
    """An inference-time method on the attention engine: subclasses set ``name`` and ``Settings`` and answer."""

    name: ClassVar[str]
    label: ClassVar[str]  # as tables name it
    Settings: ClassVar[type]
    one_image: ClassVar[bool] = False  # defined for one image: items with several are answered plainly, and say so

    def __init__(self, adapter, settings_, reference_cache_size: int = 64) -> None:
        """The settings checked against the loaded model (layers, heads), before any sample; ``reference_cache_size``: how many
        images' generic-prompt maps a method that uses them keeps."""
        self.adapter, self.settings = adapter, settings_
        settings_.check(adapter)

    @classmethod
    def argument_names(cls) -> frozenset[str]:
        """The ``--model_args`` names the method takes (its settings' fields)."""
        return frozenset(f.name for f in dataclasses.fields(cls.Settings) if f.init)

    @classmethod
    def settings_from_args(cls, args: dict, defaults: dict) -> Any:
        """The settings from ``--model_args`` (strings or numbers), checked before the checkpoint loads; ``defaults``: the preset's."""
        return parse_settings(cls.Settings, args, cls.name)

    def answer(self, asked: Asked, **generate_kwargs) -> MethodOutcome:
        raise NotImplementedError

    def grounding(self) -> GroundingPlan:
        """What the method does to the maps grounding measures (default: nothing, the model's own)."""
        return GroundingPlan()

    def record(self) -> dict:
        """Every setting as used (defaults included): results files carry it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.settings).items()}

    def not_applied(self, n_images: int) -> dict:
        """The per-sample log of an item the method is not defined for (several images where it takes one)."""
        return {"method": {"name": self.name, "applied": f"no: {n_images} images ({self.label} is defined for one)"}}


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Make a method known by its name (each method module registers its class)."""
    METHODS[cls.name] = cls
    return cls
