"""Medical VQA tasks: docs from lmms_vg.medvqa, scoring from lmms_vg.scoring / vqa_results."""

import os
from collections import Counter

import datasets

from lmms_vg import medvqa, prompts, scoring, vqa_results


def _as_dataset(docs):
    return docs if isinstance(docs, datasets.Dataset) else datasets.Dataset.from_list(docs)


def _closed(benchmark):
    return lambda _descriptor: _as_dataset(medvqa.closed_docs(benchmark))


def _open(benchmark):
    return lambda _descriptor: _as_dataset(medvqa.open_docs(benchmark))


closed_vqa_rad, closed_slake, closed_pathvqa = _closed("vqa_rad"), _closed("slake"), _closed("pathvqa")
closed_pmc_vqa, closed_omnimedvqa, closed_mmmu_med = _closed("pmc_vqa"), _closed("omnimedvqa"), _closed("mmmu_med")
open_vqa_rad, open_slake, open_pathvqa = _open("vqa_rad"), _open("slake"), _open("pathvqa")


def doc_to_visual(doc):
    return medvqa.load_images(doc)


def closed_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    try:
        return scoring.mc_prompt(doc["question"], list(doc["options"]))
    except scoring.ItemError:
        return doc["question"]  # unscorable: it is reported and excluded in process_results


def open_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompts.open_question(doc["question"])


def closed_process_results(doc, results):
    outcome = vqa_results.closed_outcome(doc, results[0])
    return {"accuracy": outcome, "breakdown": outcome, "samples": outcome}


def open_process_results(doc, results):
    outcome = vqa_results.open_outcome(doc, results[0])
    return {"bleu1": outcome, "open_recall": outcome, "bertscore": outcome, "samples": outcome}


def agg_accuracy(outcomes):
    return vqa_results.accuracy(outcomes)


def agg_breakdown(outcomes):
    return vqa_results.breakdown(outcomes)


def agg_counts(outcomes):
    benchmarks = {o["benchmark"] for o in outcomes}
    left_out = sum((medvqa.LEFT_OUT.get(b, Counter()) for b in benchmarks), Counter())
    return vqa_results.counts(outcomes, left_out)


def agg_group_accuracy(values, sizes, weight_by_size=True):
    """The group's "Avg.": weighted by the items each benchmark scored (the paper's), not by its docs."""
    return vqa_results.weighted_average(values, sizes, weight_by_size)


def agg_bleu1(outcomes):
    return vqa_results.mean_of(outcomes, "bleu1")


def agg_recall(outcomes):
    return vqa_results.mean_of(outcomes, "recall")


def agg_bertscore(outcomes):
    scored = [o for o in outcomes if not o.get("excluded")]
    f1, reason = scoring.bertscore_f1(
        [o["output"] for o in scored], [o["answer"] for o in scored], os.environ.get("LMMS_VG_BERTSCORE_MODEL")
    )
    return {"unavailable": reason} if f1 is None else 100.0 * sum(f1) / max(len(f1), 1)
