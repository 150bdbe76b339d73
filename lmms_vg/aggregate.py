"""Aggregation of per-sample grounding records into the task's results (plain lists, JSON-ready)."""

from __future__ import annotations

import numpy as np

from . import outputs
from .outputs import GroundingRecord
from .reasons import reason_key


def scored(records: list[dict]) -> list[GroundingRecord]:
    return [r for r in (GroundingRecord(**x) for x in records) if r.skipped is None and r.kl]


def _nanmean(values) -> list:
    """Mean over samples (axis 0), NaN entries (undefined: an exact zero in the reference) left out; None where none is defined."""
    values = np.asarray(values, dtype=float)
    defined = (~np.isnan(values)).sum(0)
    total = np.where(np.isnan(values), 0.0, values).sum(0)
    mean = np.divide(total, defined, out=np.full(total.shape, np.nan), where=defined > 0).round(6)
    return np.where(np.isnan(mean), None, mean).tolist()


def layer_means(records: list[dict], metric: str) -> list[float | None]:
    """Mean per layer over the scored samples (lists indexed by layer); a sample's undefined layers are left out of that layer's mean."""
    good = scored(records)
    if not good:
        return []
    return _nanmean([getattr(r, metric) for r in good])


def best_layer(records: list[dict]) -> dict:
    """The layer with the lowest mean KL, with its mean AR, KL and JS."""
    kl = layer_means(records, "kl")
    if not kl or all(v is None for v in kl):
        return {"layer": None, "ar": None, "kl": None, "js": None}
    layer = int(np.nanargmin(np.array(kl, dtype=float)))
    return {"layer": layer, "ar": layer_means(records, "ar")[layer], "kl": kl[layer], "js": layer_means(records, "js")[layer]}


def head_kl_means(records: list[dict]) -> list[list[float]] | None:
    """Mean KL per (layer, head), for head calibration; None unless the run was head-level."""
    good = [r for r in scored(records) if r.head_kl is not None]
    if not good:
        return None
    return _nanmean([r.head_kl for r in good])


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
        "zero_reference_layers": sum(r.zero_reference_layers for r in recs),  # (sample, layer) pairs left out of the layer means
        **outputs.run_field(r.run for r in recs),
    }
