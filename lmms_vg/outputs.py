"""What an lmms-vg model hands a task for one sample, as the string lmms-eval carries, and back.

lmms-eval passes each model output to the task as a string. For lmms-vg's own tasks that string is
one of three typed values, encoded as JSON tagged ``{"lmms_vg": <kind>, ...}``: an :class:`Answer`
(the text, and what its method did), a :class:`GroundingRecord` or a :class:`SampleError` (why the
sample could not run). Any other string decodes as a plain answer, so outputs for lmms-eval's own
tasks stay plain text. Answers and records carry the :class:`RunRecord` of the run that made them
(model, checkpoint, method and every setting of it), which the tasks' counts and the reports read.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields

from .presets import GENERIC_MODEL_ID

TAG = "lmms_vg"


@dataclass(frozen=True)
class RunRecord:
    """What made a number: the model id (without its method), the checkpoint it loaded, whether that is the id's own
    (False where ``pretrained=`` named another), the method (None: the baseline) and all its settings, and the layers
    its preset names (the report's fixed layer)."""

    model: str
    checkpoint: str
    method: str | None = None
    settings: dict = field(default_factory=dict)
    default_checkpoint: bool = True
    layers: tuple[int, ...] = ()  # the layers the id's preset names (the paper's fixed layer, where it published one)
    maps: str | None = None  # the save_maps folder of the run's grounding maps (the sample browser draws them)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value) -> RunRecord | None:
        if not isinstance(value, dict) or "model" not in value:
            return None
        return cls(
            str(value["model"]),
            str(value.get("checkpoint", "")),
            value.get("method"),
            dict(value.get("settings") or {}),
            bool(value.get("default_checkpoint", True)),
            tuple(int(v) for v in value.get("layers") or ()),
            value.get("maps"),
        )

    @property
    def name(self) -> str:
        """The model as tables name it: its id, with the checkpoint where that is not the id's own (two checkpoints of one
        id are two rows); the generic id by its checkpoint alone."""
        if self.default_checkpoint:
            return self.model
        folder = self.checkpoint.rstrip("/").split("/")[-1] or self.checkpoint
        return folder if self.model == GENERIC_MODEL_ID else f"{self.model} [{folder}]"


def run_field(runs) -> dict:
    """``{"run": record}``: the run (``RunRecord.as_dict``) that made a task's results, a list where several did, or nothing."""
    found = {json.dumps(r, sort_keys=True) for r in runs if r}
    if not found:
        return {}
    return {"run": json.loads(found.pop()) if len(found) == 1 else [json.loads(r) for r in sorted(found)]}


@dataclass(frozen=True)
class Answer:
    """A generated answer; under VGRefine, the share of patches knocked out and where, or why it was not applied."""

    text: str
    knocked_fraction: float | None = None
    knockout_layers: tuple[int, ...] = ()
    vgrefine: str | None = None  # why VGRefine was not applied to this sample (e.g. several images)
    method: dict = field(default_factory=dict)  # PAI / AdaptVis: its name and what it did (e.g. AdaptVis's confidence and weight)
    exif_orientation: list[int] | None = None  # per image, the EXIF orientation it was turned upright from, where any was
    run: dict | None = None  # the RunRecord that made it

    def log_fields(self) -> dict:
        """What the per-sample log keeps beside the text (only what applies)."""
        extra = {"knocked_fraction": self.knocked_fraction, "knockout_layers": list(self.knockout_layers), "vgrefine": self.vgrefine}
        extra["method"] = self.method or None
        extra["exif_orientation"] = self.exif_orientation
        extra["run"] = self.run
        return {k: v for k, v in extra.items() if v not in (None, [])}


@dataclass
class GroundingRecord:
    """One sample's per-layer grounding metrics, or why it was skipped."""

    ar: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    js: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    head_kl: list[list[float]] | None = None
    n_boxes: int = 0
    n_clipped: int = 0
    skipped: str | None = None
    zero_reference_layers: int = 0  # layers whose generic-prompt map held an exact zero: their metrics are NaN
    exif_orientation: int = 0  # the EXIF orientation the image was turned upright from (0: none)
    run: dict | None = None  # the RunRecord that made it

    @classmethod
    def from_output(cls, text: str) -> GroundingRecord:
        """The record a model output holds; a sample error keeps its reason as the skip reason."""
        value = decode(text)
        if isinstance(value, cls):
            return value
        if isinstance(value, SampleError):
            return cls(skipped=value.reason)
        return cls(skipped=f"not a grounding record: the model answered {value.text[:60]!r}; run grounding tasks with an lmms-vg model")


@dataclass(frozen=True)
class SampleError:
    """A sample that could not run: ``reason`` reads ``kind: details (where)`` (:mod:`lmms_vg.reasons`)."""

    reason: str


def encode(value) -> str:
    """The string lmms-eval carries for a typed output."""
    kind = {Answer: "answer", SampleError: "error", GroundingRecord: "grounding"}[type(value)]
    return json.dumps({TAG: kind, **asdict(value)})


def decode(output: str):
    """The typed value a model output string holds: Answer, SampleError or GroundingRecord (plain text -> Answer)."""
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


class Ledger:
    """lmms-vg's answers for its own tasks, held in the process that made them until the task's scoring reads them.

    lmms-eval logs the string a model returns for a sample and hands the same string to the task. For
    lmms-vg's tasks that string is the answer's text, what a person reading the log (or lmms-eval's log
    viewer) wants to see; the rest of the answer (what its method did, the run's record) waits here
    under the doc's id and that text. A task that finds nothing here (a response from lmms-eval's
    cache) scores the text alone; a doc without an ``id`` gets the whole answer in the string.
    """

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._items: OrderedDict[tuple[str, str], Answer] = OrderedDict()

    def hand_over(self, doc: dict, answer: Answer) -> str:
        """The string lmms-eval carries for ``answer`` (its text), the answer kept for the task."""
        key = doc.get("id") if isinstance(doc, dict) else None
        if key is None:
            return encode(answer)
        self._items[(str(key), answer.text)] = answer
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
        return answer.text

    def take(self, doc: dict | None, output: str):
        """The typed value for a doc's output: the answer kept for it, else what the string decodes to."""
        key = doc.get("id") if isinstance(doc, dict) else None
        found = self._items.pop((str(key), output), None) if key is not None else None
        return found if found is not None else decode(output)


LEDGER = Ledger()
