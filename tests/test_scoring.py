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
        ("b", "B", "letter"),
        ("c.", "C", "letter"),
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
