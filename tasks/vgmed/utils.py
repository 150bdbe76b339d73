"""VGMED tasks: docs from lmms_vg.vgmed_data, metrics from lmms_vg.aggregate (no metric math here)."""

import datasets

from lmms_vg import aggregate, files, keys, scoring, vgmed_data
from lmms_vg.outputs import GroundingRecord


def _docs(kind: str, natural: bool):
    return lambda _descriptor: datasets.Dataset.from_list(vgmed_data.vgmed_docs(kind, natural))


docs_loc = _docs("localization", False)
docs_attr = _docs("attribute", False)
docs_coco_loc = _docs("localization", True)
docs_coco_attr = _docs("attribute", True)


def doc_to_visual(doc):
    if doc.get("vg_error"):  # the row itself cannot be scored: say why rather than look for its image
        raise ValueError(doc["vg_error"])
    return [files.upright(doc["vg_image"]) if doc.get("vg_image") is not None else files.open_image(doc["vg_image_path"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{scoring.moderate(doc['question']).strip()}{post}"


def process_results(doc, results):
    record = GroundingRecord.from_output(results[0]).__dict__
    return dict.fromkeys(keys.GROUNDING_METRICS, record)


def agg_ar(records):
    return aggregate.layer_means(records, "ar")


def agg_kl(records):
    return aggregate.layer_means(records, "kl")


def agg_js(records):
    return aggregate.layer_means(records, "js")


def agg_iou(records):
    return aggregate.layer_means(records, "iou")


def agg_best(records):
    return aggregate.best_layer(records)


def agg_counts(records):
    return aggregate.counts(records)


def agg_head_kl(records):
    return aggregate.head_kl_means(records)
