"""The VQA protocol's pieces one by one, with every field of their outputs written out by hand (what the task-level tests
read only through lmms-eval's aggregates)."""

import json
import math
import sys
import types

import pytest

from lmms_vg import outputs, scoring, vqa_results

RUN = {"model": "huatuo", "checkpoint": "c", "method": None, "settings": {}, "default_checkpoint": True, "layers": [], "maps": None}


def doc(i, answer="yes", options=("yes", "no"), **extra):
    return {
        "id": f"q{i}",
        "benchmark": "vqa_rad",
        "category": "CT" if i % 2 else "MRI",
        "options": list(options),
        "answer": answer,
        **extra,
    }


def said(text):
    return outputs.encode(outputs.Answer(text, run=RUN))


def test_closed_outcomes_accuracy_and_counts_field_by_field(monkeypatch):
    monkeypatch.delenv(scoring.LETTER_CASE_VAR, raising=False)
    left = json.dumps({"no image in the source": 2})
    docs = [
        doc(0, item_set="paper", vg_left_out=left),
        doc(1, item_set="paper", vg_left_out=left),
        doc(2, answer="?", item_set="paper"),  # a published "?": scored wrong, counted as such
        doc(3, item_set="own", vg_error="image unreadable: x.png"),
        doc(4),
    ]
    said_texts = ["A", "B", "A", "A", outputs.encode(outputs.SampleError("sample failed: OOM (q4)"))]
    found = [vqa_results.closed_outcome(d, said(t) if not t.startswith("{") else t) for d, t in zip(docs, said_texts)]
    first = found[0]
    assert (first.id, first.benchmark, first.category, first.output, first.item_set, first.letter_case) == (
        "q0",
        "vqa_rad",
        "MRI",
        "A",
        "paper",
        "strict",
    )
    assert (first.correct, first.pred, first.gold, first.match, first.left_out) == (True, "A", "A", "letter", left)
    assert first.method["run"] == RUN
    assert (found[1].correct, found[1].pred) == (False, "B")
    assert (found[2].correct, found[2].gold, found[2].excluded) == (False, None, None)
    assert found[3].excluded == "image unreadable: x.png" and found[3].correct is None and found[3].output.startswith("{")
    assert found[4].excluded == "sample failed: OOM (q4)"
    acc = vqa_results.accuracy(found)
    assert float(acc) == pytest.approx(100 / 3) and acc.scored == 3 and acc.item_set == "own, paper"
    nothing = vqa_results.accuracy([found[3]])
    assert math.isnan(nothing) and nothing.scored == 0 and nothing.item_set == "own"
    counts = vqa_results.counts(found)
    assert counts == {
        "total": 5,
        "scored": 3,
        "excluded": 2,
        "excluded_reasons": {"image unreadable": 1, "sample failed": 1},
        "left_out_before_run": 2,
        "left_out_reasons": {"no image in the source": 2},
        "unknown_answer_scored_wrong": 1,
        "item_set": "own, paper",
        "letter_case": "strict",
        "run": RUN,
    }
    given = vqa_results.counts(found, left_out={"x": 1})  # a count handed in is used as it is
    assert (given["left_out_before_run"], given["left_out_reasons"]) == (1, {"x": 1})
    assert vqa_results.breakdown(found) == {"CT": 0.0, "MRI": 50.0}


def test_read_output_takes_the_ledgers_answer_for_its_doc():
    the_doc = doc(7)
    handed = outputs.LEDGER.hand_over(the_doc, outputs.Answer("B", knocked_fraction=0.5))
    answer, why = vqa_results.read_output(handed, the_doc)
    assert why is None and answer.text == "B" and answer.knocked_fraction == 0.5
    assert vqa_results.read_output(said("A"))[0].text == "A"  # without a doc: the encoded answer itself
    record = outputs.encode(outputs.GroundingRecord(kl=[1.0]))
    assert vqa_results.read_output(record) == (
        None,
        "not an answer: the model returned a grounding record; run VQA tasks with a generating model",
    )


def test_open_outcomes_and_their_means():
    docs = [doc(0, answer="left lung"), doc(1, answer="heart"), doc(2, answer="liver", vg_error="image unreadable: y")]
    found = [vqa_results.open_outcome(d, said(t)) for d, t in zip(docs, ["the left lung", "no", "liver"])]
    assert (found[0].answer, found[0].output, found[0].recall, found[0].bleu1) == ("left lung", "the left lung", 1.0, pytest.approx(2 / 3))
    assert (found[1].recall, found[1].bleu1) == (0.0, 0.0) and found[1].method["run"] == RUN
    assert found[2].excluded == "image unreadable: y" and found[2].recall is None
    assert vqa_results.mean_of(found, "recall") == pytest.approx(50.0)
    assert vqa_results.mean_of(found, "bleu1") == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert math.isnan(vqa_results.mean_of(found[2:], "recall"))
    again = vqa_results.OpenOutcome.from_log(found[0].to_log())
    assert again == found[0] and vqa_results.OpenOutcome.from_log(again) is again


def test_the_group_average_weighs_by_items_scored_not_docs():
    """Two benchmarks: 10 docs of which 2 scored at 100%, 10 docs all scored at 0%: the items-scored average is 16.7, the
    docs average would be 50."""
    a, b = vqa_results.Accuracy(100.0, 2, "paper"), vqa_results.Accuracy(0.0, 10, "paper")
    assert vqa_results.weighted_average([a, b], [10, 10]) == pytest.approx(100 * 2 / 12)
    assert vqa_results.weighted_average([a, b], [10, 10], weight_by_size=False) == pytest.approx(50.0)
    assert vqa_results.weighted_average([50.0, 100.0], [1, 3]) == pytest.approx(87.5)  # plain values: their doc counts
    assert vqa_results.weighted_average([vqa_results.Accuracy(float("nan"), 0), a], [5, 5]) == pytest.approx(100.0)
    assert math.isnan(vqa_results.weighted_average([], []))


def test_outcomes_take_the_ledgers_answer_and_keep_their_defaults(monkeypatch):
    """What the model kept for the doc (VGRefine's knocked fraction) reaches the logged outcome; a doc without a category
    or an item set logs them empty; an excluded item logs the raw output."""
    monkeypatch.delenv(scoring.LETTER_CASE_VAR, raising=False)
    bare = {"id": "b1", "benchmark": "pmc_vqa", "options": ["yes", "no"], "answer": "no"}
    handed = outputs.LEDGER.hand_over(bare, outputs.Answer("B", knocked_fraction=0.25, run=RUN))
    closed = vqa_results.closed_outcome(bare, handed)
    assert (closed.correct, closed.category, closed.item_set, closed.left_out) == (True, "", "", "")
    assert closed.method["knocked_fraction"] == 0.25
    opened = {"id": "o1", "benchmark": "pmc_vqa", "answer": "heart"}
    handed = outputs.LEDGER.hand_over(opened, outputs.Answer("heart", knocked_fraction=0.75, run=RUN))
    found = vqa_results.open_outcome(opened, handed)
    assert (found.recall, found.category, found.method["knocked_fraction"]) == (1.0, "", 0.75)
    failed = outputs.encode(outputs.SampleError("sample failed: OOM (o2)"))
    excluded = vqa_results.open_outcome({"id": "o2", "benchmark": "pmc_vqa", "answer": "x"}, failed)
    assert (excluded.excluded, excluded.output) == ("sample failed: OOM (o2)", failed)
    applied = outputs.Answer("A", method={"name": "vicrop", "applied": "no: 2 images"}, run=RUN)
    named = vqa_results.closed_outcome(doc(11), outputs.encode(applied))
    assert named.to_log()["method"] == {"name": "vicrop", "applied": "no: 2 images"}  # the method's own record, by its name
    assert vqa_results.ClosedOutcome.from_log(json.loads(json.dumps(named.to_log()))) == named


def test_breakdowns_keep_four_places_and_named_categories_only_and_counts_name_each_letter_case(monkeypatch):
    monkeypatch.delenv(scoring.LETTER_CASE_VAR, raising=False)
    docs = [doc(1), doc(3), doc(5, answer="no"), {**doc(7), "category": ""}]
    found = [vqa_results.closed_outcome(d, said("A")) for d in docs]
    assert vqa_results.breakdown(found) == {"CT": 66.6667}  # 2 of 3; the uncategorised item is in no group
    monkeypatch.setenv(scoring.LETTER_CASE_VAR, "lenient")
    found.append(vqa_results.closed_outcome(doc(9), said("a")))
    assert found[-1].correct and vqa_results.counts(found)["letter_case"] == "lenient, strict"


def test_the_average_warns_where_it_mixes_the_papers_item_set_with_others(caplog):
    paper, own, other = (vqa_results.Accuracy(50.0, 4, s) for s in ("paper", "own", "other"))
    for values, warned in (([paper, own], True), ([paper, paper], False), ([own, other], False), ([paper, 40.0], True)):
        caplog.clear()
        vqa_results.weighted_average(values, [4, 4])
        assert ("not comparable with the paper's Avg." in caplog.text) == warned, values
    assert vqa_results.weighted_average([float("nan"), 50.0], [5, 5]) == pytest.approx(50.0)  # an unscored value counts nowhere


# ---------------------------------------------------------------- scoring
def test_options_up_to_the_last_letter_are_allowed():
    scoring.check_options([f"option {i}" for i in range(len(scoring.LETTERS))])
    with pytest.raises(scoring.ItemError, match="too many options"):
        scoring.check_options([f"option {i}" for i in range(len(scoring.LETTERS) + 1)])


def test_option_text_matches_whole_words_lower_cased_as_the_published_scorer():
    """'no' inside 'not' is no answer; 'Straße' is not 'strasse' (lower-casing keeps the ß, as the original's lower() does)."""
    assert scoring.parse_answer("It is not visible", ["yes", "no"]).letter is None
    assert scoring.parse_answer("no", ["yes", "no"]).letter == "B"
    assert scoring.parse_answer("strasse", ["Straße", "Weg"]).letter is None


def test_bleu1_and_recall_by_hand():
    assert scoring.bleu1("left lung", "the left lung") == pytest.approx(1.0 * math.exp(1 - 3 / 2))  # short: brevity penalty
    assert scoring.bleu1("the left lung", "left lung") == pytest.approx(2 / 3)  # long: no penalty
    assert scoring.bleu1("a b", "a c") == pytest.approx(0.5)  # as long as the reference: no penalty
    assert scoring.open_recall("anything", "") == 0.0 and scoring.bleu1("", "x") == 0.0


def test_bertscore_calls_the_package_as_documented(monkeypatch):
    calls = []

    class F1(list):
        def tolist(self):
            return list(self)

    def score(predictions, references, **kwargs):
        calls.append((predictions, references, kwargs))
        return None, None, F1([0.5, 0.25])

    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(score=score))
    monkeypatch.delenv("LMMS_VG_BERTSCORE_LAYERS", raising=False)
    assert scoring.bertscore_f1(["a", "b"], ["c", "d"], "/models/roberta-large") == ([0.5, 0.25], None)
    assert calls == [(["a", "b"], ["c", "d"], {"model_type": "/models/roberta-large", "num_layers": 17, "lang": "en", "verbose": False})]
    monkeypatch.setenv("LMMS_VG_BERTSCORE_LAYERS", "9")
    scoring.bertscore_f1(["a"], ["c"], "/m")
    assert calls[-1][2]["num_layers"] == 9
    assert scoring.bertscore_f1(["a"], ["c"], None) == (
        None,
        "no scoring model: set LMMS_VG_BERTSCORE_MODEL to a local model folder (e.g. roberta-large)",
    )
    monkeypatch.setitem(sys.modules, "bert_score", None)
    assert scoring.bertscore_f1(["a"], ["c"], "/m") == (None, "bert-score is not installed: pip install 'lmms-vg[bertscore]'")
