"""Aggregation of per-sample grounding records into the task's results (plain lists, JSON-ready)."""

from __future__ import annotations

import numpy as np

from .grounding import GroundingRecord
from .reasons import reason_key


def scored(records: list[dict]) -> list[GroundingRecord]:
    return [r for r in (GroundingRecord(**x) for x in records) if r.skipped is None and r.kl]


def layer_means(records: list[dict], metric: str) -> list[float]:
    """Mean per layer over the scored samples (lists indexed by layer)."""
    good = scored(records)
    if not good:
        return []
    return np.mean([getattr(r, metric) for r in good], axis=0).round(6).tolist()


def best_layer(records: list[dict]) -> dict:
    """The layer with the lowest mean KL, with its mean AR, KL and JS."""
    kl = layer_means(records, "kl")
    if not kl:
        return {"layer": None, "ar": None, "kl": None, "js": None}
    layer = int(np.argmin(kl))
    return {"layer": layer, "ar": layer_means(records, "ar")[layer], "kl": kl[layer], "js": layer_means(records, "js")[layer]}


def head_kl_means(records: list[dict]) -> list[list[float]] | None:
    """Mean KL per (layer, head), for head calibration; None unless the run was head-level."""
    good = [r for r in scored(records) if r.head_kl is not None]
    if not good:
        return None
    return np.mean([r.head_kl for r in good], axis=0).round(6).tolist()


def counts(records: list[dict]) -> dict:
    recs = [GroundingRecord(**x) for x in records]
    skipped = [r.skipped for r in recs if r.skipped is not None]
    reasons: dict[str, int] = {}
    for s in skipped:  # per kind; each sample's log keeps its whole reason
        key = reason_key(s)
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "scored": len(recs) - len(skipped),
        "skipped": len(skipped),
        "skip_reasons": reasons,
        "clipped_boxes": sum(r.n_clipped for r in recs),
    }
