"""Medical VQA tasks: docs from lmms_vg.vqa_data, scoring from lmms_vg.scoring / vqa_results."""

import os

import datasets

from lmms_vg import keys, prompts, scoring, vqa_data, vqa_results


def _as_dataset(docs):
    return docs if isinstance(docs, datasets.Dataset) else datasets.Dataset.from_list(docs)


def _closed_docs(benchmark):
    return lambda _descriptor: _as_dataset(vqa_data.closed_docs(benchmark))


def _open_docs(benchmark):
    return lambda _descriptor: _as_dataset(vqa_data.open_docs(benchmark))


closed_vqa_rad, closed_slake, closed_pathvqa = _closed_docs("vqa_rad"), _closed_docs("slake"), _closed_docs("pathvqa")
closed_pmc_vqa, closed_omnimedvqa, closed_mmmu_med = _closed_docs("pmc_vqa"), _closed_docs("omnimedvqa"), _closed_docs("mmmu_med")
open_vqa_rad, open_slake, open_pathvqa = _open_docs("vqa_rad"), _open_docs("slake"), _open_docs("pathvqa")


def doc_to_visual(doc):
    return vqa_data.load_images(doc)


def closed_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    try:
        return scoring.mc_prompt(doc["question"], list(doc["options"]))
    except scoring.ItemError:
        return doc["question"]  # unscorable: it is reported and excluded in process_results


def open_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompts.open_question(doc["question"])


def closed_process_results(doc, results):
    outcome = vqa_results.closed_outcome(doc, results[0]).to_log()  # lmms-eval logs and aggregates plain records
    return dict.fromkeys(keys.CLOSED_METRICS, outcome)


def open_process_results(doc, results):
    outcome = vqa_results.open_outcome(doc, results[0]).to_log()
    return dict.fromkeys(keys.OPEN_METRICS, outcome)


def _closed(records):
    return [vqa_results.ClosedOutcome.from_log(r) for r in records]


def _open(records):
    return [vqa_results.OpenOutcome.from_log(r) for r in records]


def agg_accuracy(records):
    return vqa_results.accuracy(_closed(records))


def agg_breakdown(records):
    return vqa_results.breakdown(_closed(records))


def agg_counts(records):
    """The counts of a closed or an open task (an open record carries the reference ``answer``)."""
    outcomes = _open(records) if records and "answer" in records[0] else _closed(records)
    return vqa_results.counts(outcomes)


def agg_group_accuracy(values, sizes, weight_by_size=True):
    """The group's "Avg.": weighted by the items each benchmark scored (the paper's), not by its docs."""
    return vqa_results.weighted_average(values, sizes, weight_by_size)


def agg_bleu1(records):
    return vqa_results.mean_of(_open(records), "bleu1")


def agg_recall(records):
    return vqa_results.mean_of(_open(records), "recall")


def agg_bertscore(records):
    scored = [o for o in _open(records) if not o.excluded]
    f1, reason = scoring.bertscore_f1([o.output for o in scored], [o.answer for o in scored], os.environ.get("LMMS_VG_BERTSCORE_MODEL"))
    return {"unavailable": reason} if f1 is None else 100.0 * sum(f1) / max(len(f1), 1)
