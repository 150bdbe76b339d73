"""Medical VQA scoring under HuatuoGPT-Vision's protocol (SPEC section 4).

Closed-ended: the option letter parsed from the output (HuatuoGPT-Vision's regex), compared with
the gold letter as written (the published scorer does not upper-case it: "b" is not "B"), falling
back to the option text when no letter is found. An item whose published answer is ``?`` is scored
wrong, as the published scorer does. Open-ended: BLEU-1, OpenRecall, and BERTScore where
a scoring model is available locally.
"""

from __future__ import annotations

import math
import os
import re
import string
from collections import Counter
from dataclasses import dataclass

from .prompts import MC_INSTRUCTION

LETTERS = "ABCDEFGHIJK"
UNKNOWN_ANSWER = "answer is '?' in the source (scored wrong, as the published scorer does)"
LETTER_CASE_VAR = "LMMS_VG_LETTER_CASE"  # strict (default: the published scorer) or lenient (b reads as B)
# HuatuoGPT-Vision's chatbot removes these from every prompt text before inserting its image placeholders
MODERATED = ("<image>", "<s>", "</s>")
# HuatuoGPT-Vision's pattern: a letter a-n standing alone, not the article "A "/"a ".
LETTER_PATTERN = re.compile(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([a-nA-N])(\W|$)")


class ItemError(ValueError):
    """A VQA item that cannot be scored (reported per sample, excluded from the denominator)."""


def mc_prompt(question: str, options: list[str]) -> str:
    """``{question}\\n{A. opt}\\n...\\nAnswer with the option's letter from the given choices directly.``

    As HuatuoGPT-Vision's evaluation builds it: ``<image>``, ``<s>`` and ``</s>`` are removed from the
    text (its ``input_moderation``); ``<image k>`` references stay as written.
    """
    check_options(options)
    lines = [moderate(question).strip()] + [f"{LETTERS[i]}. {moderate(opt)}" for i, opt in enumerate(options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def moderate(text: str) -> str:
    """The text without the tokens HuatuoGPT-Vision's chatbot strips (a literal ``<image>`` would be read as a second image)."""
    for token in MODERATED:
        text = text.replace(token, "")
    return text


def letter_case() -> str:
    """``strict`` (default, the published scorer) or ``lenient``, from LMMS_VG_LETTER_CASE; anything else is an error."""
    import os

    value = os.environ.get(LETTER_CASE_VAR, "strict").strip().lower()
    if value not in ("strict", "lenient"):
        raise ValueError(f"{LETTER_CASE_VAR}={value!r}: use 'strict' (the published scorer: 'b' is not 'B') or 'lenient'")
    return value


def check_options(options: list[str]) -> None:
    if not options:
        raise ItemError("no options: empty options list")
    if len(options) > len(LETTERS):
        raise ItemError(f"too many options: {len(options)}; at most {len(LETTERS)} letters are defined")
    repeated = sorted({opt for i, opt in enumerate(options) if opt in options[:i]})
    if repeated:  # the gold letter is the first copy's; a model choosing another copy would be marked wrong
        raise ItemError(f"duplicated options: {repeated!r} listed more than once in {options!r}")


def gold_letter(options: list[str], answer: str) -> str | None:
    """The answer's option letter; None for a published ``?`` answer (scored wrong)."""
    check_options(options)
    if answer == "?":
        return None
    if answer not in options:
        raise ItemError(f"answer not among the options: {answer!r} is not in {options!r}")
    return LETTERS[options.index(answer)]


@dataclass
class ParsedAnswer:
    letter: str | None  # the predicted option letter as written (case kept), or None
    how: str  # "letter", "option_text", "none"


def _normalise(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def parse_answer(output: str, options: list[str], lenient: bool = False) -> ParsedAnswer:
    """The option letter the output chose: first regex letter (as written; upper-cased when ``lenient``); else the one option whose text it contains."""
    match = LETTER_PATTERN.search(output)
    if match:
        letter = match.group(2)
        return ParsedAnswer(letter.upper() if lenient else letter, "letter")
    text = _normalise(output)
    if not text:
        return ParsedAnswer(None, "none")
    padded = f" {text} "
    found = [i for i, opt in enumerate(options) if _normalise(opt) and f" {_normalise(opt)} " in padded]
    # an option whose text lies inside another found option's text (e.g. "lung" in "left lung") yields to it
    found = [i for i in found if not any(j != i and _normalise(options[i]) in _normalise(options[j]) for j in found)]
    if len(found) == 1:
        return ParsedAnswer(LETTERS[found[0]], "option_text")
    return ParsedAnswer(None, "none")


def tokens(text: str) -> list[str]:
    return _normalise(text).split()


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 0.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    precision = overlap / len(pred)
    penalty = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return precision * penalty


def open_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference answer's tokens present in the prediction."""
    ref = tokens(reference)
    if not ref:
        return 0.0
    pred = set(tokens(prediction))
    return sum(t in pred for t in ref) / len(ref)


def bertscore_f1(predictions: list[str], references: list[str], model_path: str | None) -> tuple[list[float] | None, str | None]:
    """BERTScore F1 with a local scoring model; (None, reason) when it cannot be computed here."""
    if not model_path:
        return None, "no scoring model: set LMMS_VG_BERTSCORE_MODEL to a local model folder (e.g. roberta-large)"
    try:
        from bert_score import score
    except ImportError:
        return None, "bert-score is not installed: pip install 'lmms-vg[bertscore]'"
    try:
        layers = int(os.environ.get("LMMS_VG_BERTSCORE_LAYERS", "17"))  # roberta-large's default layer
        _, _, f1 = score(predictions, references, model_type=model_path, num_layers=layers, lang="en", verbose=False)
    except Exception as err:  # noqa: BLE001 - a broken or missing local model must not end the run
        return None, f"BERTScore failed with model '{model_path}': {err}"
    return f1.tolist(), None
