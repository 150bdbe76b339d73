"""What an lmms-vg task asks of a model: its ``generation_kwargs.lmms_vg`` entry, parsed strictly into one value.

A task names the doc fields it provides (a wrapper knows the model, a task knows its data); a
misspelt key or a value of the wrong kind is an error that names it, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from . import settings

KEY = "lmms_vg"  # the generation_kwargs entry that marks an lmms-vg task


@dataclass(frozen=True)
class TaskRequest:
    """An lmms-vg task's request: answer (VQA) or grounding, with the doc fields the model reads."""

    mode: Literal["answer", "grounding"] = "answer"
    reference_prompt: str | None = None  # the generic prompt for normalisation and VGRefine's triage (None: the default)
    question_key: str | None = None  # the doc field with the bare question (ViCrop's attention passes)
    image_key: str | None = None  # the doc field naming the image (the per-image reference cache)
    boxes: str | None = None  # grounding: the doc field with the boxes (original pixels)
    box_format: Literal["xyxy", "xywh"] = "xyxy"
    skip_reason: str | None = None  # grounding: the doc field saying why a row cannot be scored
    head_level: bool = False  # grounding: per-head KL too (for calibration)

    @classmethod
    def parse(cls, value, task: str = "task") -> TaskRequest:
        """From the YAML's ``generation_kwargs.lmms_vg`` (a dict); unknown keys and wrong kinds are named."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise TypeError(f"{task}: generation_kwargs.{KEY} must be a mapping, not {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{task}: generation_kwargs.{KEY} has unknown keys {unknown}; known: {sorted(known)}")
        found = dict(value)
        if "head_level" in found:
            found["head_level"] = settings.as_bool(f"generation_kwargs.{KEY}.head_level", found["head_level"])
        for name in ("reference_prompt", "question_key", "image_key", "boxes", "skip_reason"):
            if found.get(name) is not None and not isinstance(found[name], str):
                raise ValueError(f"{task}: generation_kwargs.{KEY}.{name}={found[name]!r} must be text")
        request = cls(**found)
        if request.mode not in ("answer", "grounding"):
            raise ValueError(f"{task}: generation_kwargs.{KEY}.mode={request.mode!r}: 'answer' or 'grounding'")
        if request.box_format not in ("xyxy", "xywh"):
            raise ValueError(f"{task}: generation_kwargs.{KEY}.box_format={request.box_format!r}: 'xyxy' or 'xywh'")
        if request.mode == "grounding" and not request.boxes:
            raise ValueError(f"task {task}: a grounding task names its boxes' doc field in generation_kwargs.{KEY}.boxes")
        return request
