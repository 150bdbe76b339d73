"""Option-letter parsing and open-ended metrics, case by case."""

import math

import pytest

from lmms_vg import scoring

OPTS = ["left lung", "right lung", "liver", "heart"]


@pytest.mark.parametrize(
    "output, letter, how",
    [
        ("A", "A", "letter"),
        ("(B)", "B", "letter"),
        ("Answer: C", "C", "letter"),
        ("The answer is D.", "D", "letter"),
        ("b", "b", "letter"),  # kept as written: the published scorer compares it with the gold "B" and finds it wrong
        ("c.", "c", "letter"),
        ("A lesion is seen, so the answer is B.", "B", "letter"),  # "A " is the article, not option A
        ("it is a mass in the right lung", "B", "option_text"),  # no letter: the one option whose text is present
        ("B or C", "B", "letter"),  # two letters: the first
        ("", None, "none"),
        ("   ", None, "none"),
        ("A thing in the lung", None, "none"),  # "lung" is no option on its own
        ("the heart, I believe", "I", "letter"),  # the protocol's regex takes a lone capital I (kept as published)
    ],
)
def test_parse_answer(output, letter, how):
    parsed = scoring.parse_answer(output, OPTS)
    assert (parsed.letter, parsed.how) == (letter, how)


def test_letters_compare_as_written_unless_lenient(monkeypatch):
    """The published scorer: ``match.group(2) == gold`` with the gold letter upper case, so "b" is wrong for "B"."""
    from lmms_vg import vqa_results

    doc = {"id": "1", "benchmark": "b", "options": ["x", "y"], "answer": "y", "vg_error": "", "item_set": "paper"}
    strict = vqa_results.closed_outcome(doc, "b")
    assert (strict.pred, strict.gold, strict.correct, strict.letter_case) == ("b", "B", False, "strict")
    assert vqa_results.closed_outcome(doc, "B").correct is True
    monkeypatch.setenv("LMMS_VG_LETTER_CASE", "lenient")
    lenient = vqa_results.closed_outcome(doc, "b")
    assert (lenient.pred, lenient.correct, lenient.letter_case) == ("B", True, "lenient")
    assert vqa_results.counts([lenient])["letter_case"] == "lenient"
    monkeypatch.setenv("LMMS_VG_LETTER_CASE", "loose")
    with pytest.raises(ValueError, match="LMMS_VG_LETTER_CASE"):
        vqa_results.closed_outcome(doc, "b")


def test_unknown_answer_is_scored_wrong_as_published():
    """The published scorer sets ``is_correct = False`` for an answer ``?`` and keeps it in the denominator."""
    from lmms_vg import vqa_results

    doc = {"id": "1", "benchmark": "b", "options": ["x", "y"], "answer": "?", "vg_error": ""}
    out = vqa_results.closed_outcome(doc, "A")
    good = vqa_results.closed_outcome({**doc, "answer": "x"}, "A")
    assert out.correct is False and out.gold is None
    assert vqa_results.accuracy([out, good]) == 50.0
    assert vqa_results.counts([out, good])["unknown_answer_scored_wrong"] == 1


def test_prompt_strips_image_tokens_and_keeps_image_references():
    """HuatuoGPT-Vision's input_moderation removes '<image>', '<s>', '</s>'; '<image 2>' is text and stays."""
    prompt = scoring.mc_prompt("<image>Compare <image 1> and <image 2></s>", ["a", "b<s>"])
    assert prompt.splitlines()[:3] == ["Compare <image 1> and <image 2>", "A. a", "B. b"]


def test_option_inside_another_option_yields_to_the_longer():
    assert scoring.parse_answer("left lung", ["lung", "left lung"]).letter == "B"
    assert scoring.parse_answer("the lung and the liver", ["lung", "liver"]).letter is None  # two options named


def test_options_beyond_d():
    options = [f"opt{i}" for i in range(8)]
    assert scoring.gold_letter(options, "opt6") == "G"
    assert scoring.parse_answer("G", options).letter == "G"
    prompt = scoring.mc_prompt("Q?", options)
    assert prompt.splitlines()[7] == "G. opt6"
    assert prompt.endswith("Answer with the option's letter from the given choices directly.")


def test_prompt_layout():
    assert (
        scoring.mc_prompt(" Is it? ", ["yes", "no"])
        == "Is it?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly."
    )


def test_bad_items():
    with pytest.raises(scoring.ItemError, match="not among the options"):
        scoring.gold_letter(["yes", "no"], "maybe")
    with pytest.raises(scoring.ItemError, match="empty options"):
        scoring.gold_letter([], "yes")
    with pytest.raises(scoring.ItemError, match="at most"):
        scoring.mc_prompt("q", [str(i) for i in range(12)])


def test_bleu1_and_recall_by_hand():
    # pred 3 tokens, ref 2 tokens; overlap 2 -> precision 2/3, no brevity penalty (pred longer)
    assert scoring.bleu1("the left lung", "left lung") == pytest.approx(2 / 3)
    # pred 1 token, ref 2: precision 1, brevity penalty exp(1 - 2/1)
    assert scoring.bleu1("lung", "left lung") == pytest.approx(math.exp(-1))
    assert scoring.bleu1("", "x") == 0.0
    assert scoring.open_recall("It is the left lung.", "Left lung") == 1.0
    assert scoring.open_recall("lung", "left lung") == 0.5


def test_bertscore_unavailable_is_reported_not_raised():
    f1, reason = scoring.bertscore_f1(["a"], ["a"], None)
    assert f1 is None and "LMMS_VG_BERTSCORE_MODEL" in reason
    f1, reason = scoring.bertscore_f1(["a"], ["a"], "/nonexistent/model")
    assert f1 is None and reason


def test_task_yamls_carry_the_prompts_of_lmms_vg_prompts():
    """The YAMLs hold their prompts as data; they must be the ones the code and the paper use."""
    from pathlib import Path

    import yaml

    from lmms_vg import prompts

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    tasks = Path(__file__).resolve().parent.parent / "tasks"

    def read(name):
        return yaml.load((tasks / name).read_text(), Loader=Loader)

    grounding = read("vgmed/_default_template_yaml")
    assert grounding["generation_kwargs"]["lmms_vg"]["reference_prompt"] == prompts.GENERIC_PROMPT + prompts.SHORT_ANSWER
    assert grounding["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == prompts.SHORT_ANSWER
    closed = read("medvqa/_closed_yaml")["generation_kwargs"]["lmms_vg"]["reference_prompt"]
    assert closed == f"{prompts.GENERIC_PROMPT}\n{prompts.MC_INSTRUCTION}"  # the instruction as mc_prompt places it
    opened = read("medvqa/_open_yaml")["generation_kwargs"]["lmms_vg"]["reference_prompt"]
    assert opened == prompts.open_question(prompts.GENERIC_PROMPT)  # the instruction as open_question places it


def test_task_yamls_list_the_metrics_lmms_vg_keys_names():
    """Metric names are defined once (lmms_vg.keys): every YAML's metric_list is the set its process_results fills."""
    from pathlib import Path

    import yaml

    from lmms_vg import keys

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    tasks = Path(__file__).resolve().parent.parent / "tasks"
    expected = {
        "vgmed/_default_template_yaml": keys.GROUNDING_METRICS,
        "medvqa/_closed_yaml": keys.CLOSED_METRICS,
        "medvqa/_open_yaml": keys.OPEN_METRICS,
    }
    for name, metrics in expected.items():
        listed = [m["metric"] for m in yaml.load((tasks / name).read_text(), Loader=Loader)["metric_list"]]
        assert sorted(listed) == sorted(metrics), name
