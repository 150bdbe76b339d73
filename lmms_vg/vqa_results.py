"""Per-sample VQA outcomes and their aggregation (accuracy, breakdowns, exclusions)."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict

from . import outputs, scoring
from .reasons import reason_key

log = logging.getLogger(__name__)
PAPER_ITEM_SET = "paper"  # medvqa.BUNDLE_ITEM_SET: the items HuatuoGPT-Vision's bundle holds, those the paper reports


def read_output(output: str) -> tuple[outputs.Answer | None, str | None]:
    """A model output as (answer, None), or (None, why the sample could not run)."""
    value = outputs.decode(output)
    if isinstance(value, outputs.SampleError):
        return None, value.reason
    if isinstance(value, outputs.Answer):
        return value, None
    return None, "not an answer: the model returned a grounding record; run VQA tasks with a generating model"


def closed_outcome(doc: dict, output: str) -> dict:
    """One closed item: parsed letter, gold letter, how it matched, correct (None = excluded, with the reason).

    Letters compare as written (the published scorer), or upper-cased with LMMS_VG_LETTER_CASE=lenient;
    the outcome names which. A published ``?`` answer is scored wrong (``gold`` None), as that scorer does.
    """
    case = scoring.letter_case()
    base = {"id": doc["id"], "benchmark": doc["benchmark"], "category": doc.get("category", ""), "output": output}
    base |= {"item_set": doc.get("item_set", ""), "letter_case": case}
    answer, reason = read_output(output)
    reason = doc.get("vg_error") or reason
    gold = None
    if not reason:
        try:
            gold = scoring.gold_letter(list(doc["options"]), doc["answer"])
        except scoring.ItemError as err:
            reason = str(err)
    if reason:
        return {**base, "correct": None, "excluded": reason}
    parsed = scoring.parse_answer(answer.text, list(doc["options"]), lenient=case == "lenient")
    correct = gold is not None and parsed.letter == gold
    return {
        **base,
        **answer.log_fields(),
        "output": answer.text,
        "pred": parsed.letter,
        "gold": gold,
        "match": parsed.how,
        "correct": correct,
    }


def open_outcome(doc: dict, output: str) -> dict:
    base = {"id": doc["id"], "benchmark": doc["benchmark"], "category": doc.get("category", ""), "output": output, "answer": doc["answer"]}
    answer, reason = read_output(output)
    reason = doc.get("vg_error") or reason
    if reason:
        return {**base, "excluded": reason, "bleu1": None, "recall": None}
    return {
        **base,
        **answer.log_fields(),
        "output": answer.text,
        "bleu1": scoring.bleu1(answer.text, doc["answer"]),
        "recall": scoring.open_recall(answer.text, doc["answer"]),
    }


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


def accuracy(outcomes: list[dict]) -> Accuracy:
    scored = [o["correct"] for o in outcomes if o["correct"] is not None]
    item_set = ", ".join(sorted({o["item_set"] for o in outcomes if o.get("item_set")}))
    return Accuracy(100.0 * sum(scored) / len(scored) if scored else float("nan"), len(scored), item_set)


def weighted_average(values: list[float], sizes: list[int], weight_by_size: bool = True) -> float:
    """The paper's "Avg.": each benchmark's accuracy weighted by the items it scored (its doc count when unknown)."""
    sets = {getattr(v, "item_set", "") for v in values}
    if len(sets) > 1 and PAPER_ITEM_SET in sets:
        log.warning("the average mixes the paper's item sets with others (%s): it is not comparable with the paper's Avg.", sorted(sets))
    weights = [getattr(v, "scored", n) if weight_by_size else 1 for v, n in zip(values, sizes)]
    pairs = [(float(v), w) for v, w in zip(values, weights) if w and not math.isnan(float(v))]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else float("nan")


def breakdown(outcomes: list[dict]) -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for o in outcomes:
        if o["category"] and o["correct"] is not None:  # categories with scored items only
            groups[o["category"]].append(o)
    return {k: round(accuracy(v), 4) for k, v in sorted(groups.items())}


def counts(outcomes: list[dict], left_out: Counter | None = None) -> dict:
    """How many items were sent, scored and excluded (with why), how many the data left out before the run, and the item set."""
    excluded = Counter(reason_key(o["excluded"]) for o in outcomes if o.get("excluded"))
    item_sets = Counter(o["item_set"] for o in outcomes if o.get("item_set"))
    result = {
        "total": len(outcomes),
        "scored": len(outcomes) - sum(excluded.values()),
        "excluded": sum(excluded.values()),
        "excluded_reasons": dict(excluded),
        "left_out_before_run": sum((left_out or {}).values()),
        "left_out_reasons": dict(left_out or {}),
        "unknown_answer_scored_wrong": sum(1 for o in outcomes if o.get("correct") is False and o.get("gold") is None and "pred" in o),
    }
    if item_sets:
        result["item_set"] = ", ".join(sorted(item_sets))
    cases = {o["letter_case"] for o in outcomes if o.get("letter_case")}
    if cases:
        result["letter_case"] = ", ".join(sorted(cases))
    return result


def mean_of(outcomes: list[dict], key: str) -> float:
    values = [o[key] for o in outcomes if o.get(key) is not None]
    return 100.0 * sum(values) / len(values) if values else float("nan")
