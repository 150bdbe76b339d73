"""The report's statistics against independent references: Newcombe's published Wilson intervals, scipy's binomial test,
and a bootstrap worked by hand on a fixed seed."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from lmms_vg import report, stats


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score interval without continuity correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718), (29, 29, 0.8830, 1.0)],
)
def test_wilson_equals_newcombes_table(k, n, low, high):
    assert stats.wilson(k, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize(("b", "c"), [(3, 12), (0, 7), (10, 10), (1, 0), (40, 61)])
def test_exact_mcnemar_is_scipys_two_sided_binomial_test(b, c):
    assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_with_no_discordant_pair_is_one():
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_paired_bootstrap_by_hand_on_a_fixed_seed():
    """Three items, two bootstrap draws: the draws the seeded generator makes, averaged by hand."""
    a, b = [1, 0, 0], [1, 1, 0]
    picks = np.random.default_rng(7).integers(0, 3, size=(2, 3))
    by_hand = [np.mean([b[i] - a[i] for i in row]) for row in picks]
    d = stats.paired_delta(a, b, samples=2, seed=7)
    assert d.delta == pytest.approx(1 / 3) and d.n == 3
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    assert d.p_value == 1.0  # one discordant pair


def test_paired_bootstrap_weights_and_interval_cover_the_delta():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400)
    b = np.where(rng.random(400) < 0.2, 1, a)  # b fixes a fifth of the items
    d = stats.paired_delta(a, b)
    assert d.low < d.delta < d.high and d.excludes_zero and d.p_value < 1e-6
    w = np.where(np.arange(400) < 200, 2.0, 1.0)
    weighted = stats.paired_delta(a, b, weights=w)
    assert weighted.delta == pytest.approx(np.sum(w * (b - a)) / np.sum(w))
    assert stats.paired_delta(a, a).excludes_zero is False


def test_bootstrap_mean_leaves_out_undefined_values():
    mean, low, high = stats.bootstrap_mean([1.0, 2.0, float("nan"), 3.0], samples=500)
    assert mean == 2.0 and 1.0 <= low <= mean <= high <= 3.0


def write_run(folder, model, method, correct: list[int], stamp: str) -> None:
    """A results file and its samples file as lmms-eval writes them for vqa_rad: per item, the closed outcome."""
    run = {"model": model, "checkpoint": "x", "method": method, "settings": {}, "default_checkpoint": True}
    acc = 100.0 * sum(correct) / len(correct)
    results = {
        "results": {"vqa_rad": {"accuracy,none": acc, "samples,none": {"scored": len(correct), "run": run}}},
        "config": {"model": model},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stamp}_results.json").write_text(json.dumps(results))
    lines = [json.dumps({"doc_id": i, "accuracy": {"id": f"rad_{i}", "correct": bool(c), "excluded": None}}) for i, c in enumerate(correct)]
    (folder / f"{stamp}_samples_vqa_rad.jsonl").write_text("\n".join(lines) + "\n")


def test_leaderboard_delta_is_paired_over_the_same_items(tmp_path):
    """30 items: the method fixes 8 and breaks 1. The delta's interval is the paired bootstrap's, McNemar's p is the exact
    binomial test of 1 in 9, and the delta is marked because its interval excludes 0."""
    base = [1] * 15 + [0] * 15
    method = list(base)
    for i in range(15, 23):
        method[i] = 1
    method[0] = 0
    write_run(tmp_path / "a", "huatuo", None, base, "20260101_000000")
    write_run(tmp_path / "b", "huatuo", "vgrefine", method, "20260101_000001")
    runs = report.load_runs([tmp_path])
    _, rows = report.leaderboard(runs)
    delta_row = rows[-1]
    expected = stats.paired_delta(base, method)
    assert delta_row[1] == f"{100 * expected.delta:+.1f}*"
    assert delta_row[2] == f"[{100 * expected.low:+.1f}, {100 * expected.high:+.1f}]"
    _, table = report.deltas(runs)
    (rad, avg) = table
    assert rad[1] == "VQA-RAD" and float(rad[5]) == pytest.approx(binomtest(1, 9, 0.5).pvalue, rel=1e-3) and rad[6:8] == ["30", "yes"]
    assert rad[8] == "browser/index.html#?a=huatuo&b=huatuo%20%2B%20VGRefine&outcome=gained&task=vqa_rad"
    assert avg[1] == "Avg." and avg[2] == rad[2]
    assert rows[0][2] == "[33.2, 66.8]"  # Wilson for 15/30
