"""Per-sample VQA outcomes and their aggregation (accuracy, breakdowns, exclusions)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from . import scoring


def model_error(output: str) -> str | None:
    """The error an lmms-vg model reports in place of an answer for a sample it could not run."""
    if output.startswith('{"lmms_vg_error"'):
        try:
            return json.loads(output)["lmms_vg_error"]
        except (json.JSONDecodeError, KeyError):
            return None
    return None


def unwrap(output: str) -> tuple[str, dict]:
    """A VGRefine structured output ``{"text", ...}`` -> (text, extra fields); plain text passes through."""
    if output.startswith('{"text"'):
        try:
            data = json.loads(output)
            return str(data.pop("text")), data
        except (json.JSONDecodeError, KeyError):
            pass
    return output, {}


def closed_outcome(doc: dict, output: str) -> dict:
    """One closed item: parsed letter, gold letter, how it matched, correct (None = excluded, with the reason)."""
    base = {"id": doc["id"], "benchmark": doc["benchmark"], "category": doc.get("category", ""), "output": output}
    reason = doc.get("vg_error") or model_error(output)
    if not reason:
        try:
            gold = scoring.gold_letter(list(doc["options"]), doc["answer"])
        except scoring.ItemError as err:
            reason = str(err)
    if reason:
        return {**base, "correct": None, "excluded": reason}
    text, extra = unwrap(output)
    parsed = scoring.parse_answer(text, list(doc["options"]))
    return {**base, **extra, "output": text, "pred": parsed.letter, "gold": gold, "match": parsed.how, "correct": parsed.letter == gold}


def open_outcome(doc: dict, output: str) -> dict:
    base = {"id": doc["id"], "benchmark": doc["benchmark"], "category": doc.get("category", ""), "output": output, "answer": doc["answer"]}
    reason = doc.get("vg_error") or model_error(output)
    if reason:
        return {**base, "excluded": reason, "bleu1": None, "recall": None}
    text, extra = unwrap(output)
    return {
        **base,
        **extra,
        "output": text,
        "bleu1": scoring.bleu1(text, doc["answer"]),
        "recall": scoring.open_recall(text, doc["answer"]),
    }


def accuracy(outcomes: list[dict]) -> float:
    scored = [o["correct"] for o in outcomes if o["correct"] is not None]
    return 100.0 * sum(scored) / len(scored) if scored else float("nan")


def breakdown(outcomes: list[dict]) -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for o in outcomes:
        if o["category"] and o["correct"] is not None:  # categories with scored items only
            groups[o["category"]].append(o)
    return {k: round(accuracy(v), 4) for k, v in sorted(groups.items())}


def counts(outcomes: list[dict]) -> dict:
    excluded = Counter(o["excluded"].split(":")[0][:80] for o in outcomes if o.get("excluded"))
    return {
        "total": len(outcomes),
        "scored": len(outcomes) - sum(excluded.values()),
        "excluded": sum(excluded.values()),
        "excluded_reasons": dict(excluded),
    }


def mean_of(outcomes: list[dict], key: str) -> float:
    values = [o[key] for o in outcomes if o.get(key) is not None]
    return 100.0 * sum(values) / len(values) if values else float("nan")
