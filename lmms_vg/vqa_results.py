"""Per-sample VQA outcomes and their aggregation (accuracy, breakdowns, exclusions)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields

from . import outputs, scoring
from .reasons import reason_key

log = logging.getLogger(__name__)
PAPER_ITEM_SET = "paper"  # medvqa.BUNDLE_ITEM_SET: the items HuatuoGPT-Vision's bundle holds, those the paper reports


def read_output(output: str, doc: dict | None = None) -> tuple[outputs.Answer | None, str | None]:
    """A model output as (answer, None), or (None, why the sample could not run); the answer the model kept for ``doc``
    where it kept one (:data:`lmms_vg.outputs.LEDGER`)."""
    value = outputs.LEDGER.take(doc, output)  # without a doc: what the string decodes to
    if isinstance(value, outputs.SampleError):
        return None, value.reason
    if isinstance(value, outputs.Answer):
        return value, None
    return None, "not an answer: the model returned a grounding record; run VQA tasks with a generating model"


class LoggedOutcome:
    """An outcome lmms-eval logs per sample as a plain JSON record, and hands the aggregations back as one."""

    def to_log(self) -> dict:
        """The per-sample record (the method's fields beside the others)."""
        record = asdict(self)
        method = record.pop("method")
        return {**record, **method}

    @classmethod
    def from_log(cls, record):
        """The outcome a logged record holds (an outcome is returned as it is)."""
        if isinstance(record, cls):
            return record
        known = {f.name for f in fields(cls)} - {"method"}
        return cls(**{k: v for k, v in record.items() if k in known}, method={k: v for k, v in record.items() if k not in known})


@dataclass(frozen=True)
class ClosedOutcome(LoggedOutcome):
    """One closed item: parsed letter, gold letter, how it matched, correct (None: excluded, ``excluded`` says why).

    ``gold`` None on a scored item: the published answer is ``?`` (scored wrong). ``method``: what
    VGRefine did for this item (knocked fraction and layers, or why it was not applied).
    """

    id: str
    benchmark: str
    category: str
    output: str
    item_set: str = ""
    letter_case: str = "strict"
    correct: bool | None = None
    excluded: str | None = None
    pred: str | None = None
    gold: str | None = None
    match: str | None = None
    left_out: str = ""  # JSON {reason: count}: its benchmark's items left out before the run (vqa_data.LEFT_OUT_FIELD)
    method: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OpenOutcome(LoggedOutcome):
    """One open item: BLEU-1 and recall of the answer (None: excluded, ``excluded`` says why)."""

    id: str
    benchmark: str
    category: str
    output: str
    answer: str
    excluded: str | None = None
    bleu1: float | None = None
    recall: float | None = None
    method: dict = field(default_factory=dict)


def _base(doc: dict, output: str) -> dict:
    return {"id": doc["id"], "benchmark": doc["benchmark"], "category": doc.get("category", ""), "output": output}


def closed_outcome(doc: dict, output: str) -> ClosedOutcome:
    """One closed item scored.

    Letters compare as written (the published scorer), or upper-cased with LMMS_VG_LETTER_CASE=lenient;
    the outcome names which. A published ``?`` answer is scored wrong (``gold`` None), as that scorer does.
    """
    case = scoring.letter_case()
    base = {**_base(doc, output), "item_set": doc.get("item_set", ""), "letter_case": case, "left_out": doc.get("vg_left_out") or ""}
    answer, reason = read_output(output, doc)
    reason = doc.get("vg_error") or reason
    gold = None
    if not reason:
        try:
            gold = scoring.gold_letter(list(doc["options"]), doc["answer"])
        except scoring.ItemError as err:
            reason = str(err)
    if reason:
        return ClosedOutcome(**base, excluded=reason)
    parsed = scoring.parse_answer(answer.text, list(doc["options"]), lenient=case == "lenient")
    return ClosedOutcome(
        **{**base, "output": answer.text},
        correct=gold is not None and parsed.letter == gold,
        pred=parsed.letter,
        gold=gold,
        match=parsed.how,
        method=answer.log_fields(),
    )


def open_outcome(doc: dict, output: str) -> OpenOutcome:
    base = {**_base(doc, output), "answer": doc["answer"]}
    answer, reason = read_output(output, doc)
    reason = doc.get("vg_error") or reason
    if reason:
        return OpenOutcome(**base, excluded=reason)
    return OpenOutcome(
        **{**base, "output": answer.text},
        bleu1=scoring.bleu1(answer.text, doc["answer"]),
        recall=scoring.open_recall(answer.text, doc["answer"]),
        method=answer.log_fields(),
    )


class Accuracy(float):
    """An accuracy (%) that knows how many items it was computed over (``scored``).

    The paper's "Avg." weighs each benchmark by the items it scored; lmms-eval hands a group's
    aggregation only the task values and their doc counts, so the count travels with the value.
    """

    scored: int
    item_set: str

    def __new__(cls, value: float, scored: int, item_set: str = ""):
        obj = super().__new__(cls, value)
        obj.scored, obj.item_set = scored, item_set
        return obj


def accuracy(outcomes: list[ClosedOutcome]) -> Accuracy:
    scored = [o.correct for o in outcomes if o.correct is not None]
    item_set = ", ".join(sorted({o.item_set for o in outcomes if o.item_set}))
    return Accuracy(100.0 * sum(scored) / len(scored) if scored else float("nan"), len(scored), item_set)


def weighted_average(values: list[float], sizes: list[int], weight_by_size: bool = True) -> float:
    """The paper's "Avg.": each benchmark's accuracy weighted by the items it scored (its doc count when unknown)."""
    sets = {getattr(v, "item_set", "") for v in values}
    if len(sets) > 1 and PAPER_ITEM_SET in sets:
        log.warning("the average mixes the paper's item sets with others (%s): it is not comparable with the paper's Avg.", sorted(sets))
    weights = [getattr(v, "scored", n) if weight_by_size else 1 for v, n in zip(values, sizes)]
    pairs = [(float(v), w) for v, w in zip(values, weights) if w and not math.isnan(float(v))]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else float("nan")


def breakdown(outcomes: list[ClosedOutcome]) -> dict[str, float]:
    groups: dict[str, list[ClosedOutcome]] = defaultdict(list)
    for o in outcomes:
        if o.category and o.correct is not None:  # categories with scored items only
            groups[o.category].append(o)
    return {k: round(accuracy(v), 4) for k, v in sorted(groups.items())}


def counts(outcomes: list[ClosedOutcome | OpenOutcome], left_out: Counter | None = None) -> dict:
    """How many items were sent, scored and excluded (with why), how many the data left out before the run, the item set,
    and the record of the run that made them (model, checkpoint, method and its settings)."""
    excluded = Counter(reason_key(o.excluded) for o in outcomes if o.excluded)
    closed = [o for o in outcomes if isinstance(o, ClosedOutcome)]
    if left_out is None:  # each benchmark's count, as its docs carried it
        notes = {o.benchmark: o.left_out for o in closed if o.left_out}
        left_out = sum((Counter(json.loads(n)) for n in notes.values()), Counter())
    item_sets = Counter(o.item_set for o in closed if o.item_set)
    result = {
        "total": len(outcomes),
        "scored": len(outcomes) - sum(excluded.values()),
        "excluded": sum(excluded.values()),
        "excluded_reasons": dict(excluded),
        "left_out_before_run": sum((left_out or {}).values()),
        "left_out_reasons": dict(left_out or {}),
        "unknown_answer_scored_wrong": sum(1 for o in closed if o.correct is False and o.gold is None),
    }
    if item_sets:
        result["item_set"] = ", ".join(sorted(item_sets))
    cases = {o.letter_case for o in closed}
    if cases:
        result["letter_case"] = ", ".join(sorted(cases))
    return result | outputs.run_field(o.method.get("run") for o in outcomes)


def mean_of(outcomes: list[OpenOutcome], key: str) -> float:
    values = [getattr(o, key) for o in outcomes if getattr(o, key) is not None]
    return 100.0 * sum(values) / len(values) if values else float("nan")
