"""What an lmms-vg model hands a task for one sample, as the string lmms-eval carries, and back.

lmms-eval passes each model output to the task as a string. For lmms-vg's own tasks that string is
one of three typed values, encoded as JSON tagged ``{"lmms_vg": <kind>, ...}``: an :class:`Answer`
(the text, and what VGRefine did), a grounding record (:class:`lmms_vg.grounding.GroundingRecord`)
or a :class:`SampleError` (why the sample could not run). Any other string decodes as a plain
answer, so outputs for lmms-eval's own tasks stay plain text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

TAG = "lmms_vg"


@dataclass(frozen=True)
class Answer:
    """A generated answer; under VGRefine, the share of patches knocked out and where, or why it was not applied."""

    text: str
    knocked_fraction: float | None = None
    knockout_layers: tuple[int, ...] = ()
    vgrefine: str | None = None  # why VGRefine was not applied to this sample (e.g. several images)
    method: dict = field(default_factory=dict)  # PAI / AdaptVis: its name and what it did (e.g. AdaptVis's confidence and weight)
    exif_orientation: list[int] | None = None  # per image, the EXIF orientation it was turned upright from, where any was

    def log_fields(self) -> dict:
        """What the per-sample log keeps beside the text (only what applies)."""
        extra = {"knocked_fraction": self.knocked_fraction, "knockout_layers": list(self.knockout_layers), "vgrefine": self.vgrefine}
        extra["method"] = self.method or None
        extra["exif_orientation"] = self.exif_orientation
        return {k: v for k, v in extra.items() if v not in (None, [])}


@dataclass(frozen=True)
class SampleError:
    """A sample that could not run: ``reason`` reads ``kind: details (where)`` (:mod:`lmms_vg.reasons`)."""

    reason: str


def encode(value) -> str:
    """The string lmms-eval carries for a typed output."""
    from .grounding import GroundingRecord

    kind = {Answer: "answer", SampleError: "error", GroundingRecord: "grounding"}[type(value)]
    return json.dumps({TAG: kind, **asdict(value)})


def decode(output: str):
    """The typed value a model output string holds: Answer, SampleError or GroundingRecord (plain text -> Answer)."""
    from .grounding import GroundingRecord

    data = None
    if output.lstrip().startswith("{"):
        try:
            data = json.loads(output)
        except json.JSONDecodeError:
            data = None
    if not isinstance(data, dict) or TAG not in data:
        return Answer(output)
    kind = data.pop(TAG)
    cls = {"answer": Answer, "error": SampleError, "grounding": GroundingRecord}.get(kind)
    if cls is None:
        return SampleError(f"unknown output kind: {kind!r} (an lmms-vg version mismatch?)")
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in known}
    if cls is Answer:
        values["knockout_layers"] = tuple(values.get("knockout_layers", ()))
    return cls(**values)
