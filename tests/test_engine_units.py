"""The engine's plan records one rule at a time, by hand: which calls a steer applies to (a prompt pass of two rows is a
prompt pass), the edit's arithmetic in the scores' own precision, and the shapes it refuses."""

import pytest
import torch

from lmms_vg import engine


def steer(steps="all", kind="amplify", value=(2.0, 0.5), cols=None):
    cols = torch.tensor([[True, False, True], [False, True, True]]) if cols is None else cols
    return engine.Steer(frozenset({1, 3}), cols, kind, torch.tensor(value), steps)


@pytest.mark.parametrize(
    ("steps", "q_len", "applies"),
    [("prefill", 2, True), ("prefill", 1, False), ("decode", 1, True), ("decode", 2, False), ("all", 1, True), ("all", 7, True)],
)
def test_a_steer_applies_to_the_calls_its_steps_name(steps, q_len, applies):
    s = steer(steps)
    assert s.applies(3, q_len) is applies and s.applies(1, q_len) is applies
    assert s.applies(2, q_len) is False  # a layer it does not name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_edit_by_hand_in_the_scores_precision(dtype):
    scores = torch.tensor([[[[-1.0, 2.0, -3.0]]], [[[4.0, -5.0, 6.0]]]], dtype=dtype)  # [B=2, H=1, R=1, kv=3]
    cols = torch.tensor([[True, False, True], [False, True, True]])
    amplified = steer("all", "amplify").edit(scores, cols)  # a + v|a|: v = 2 for the first sample, 0.5 for the second
    assert amplified.dtype == dtype
    assert amplified.float().flatten().tolist() == [1.0, 2.0, 3.0, 4.0, -2.5, 9.0]
    scaled = steer("all", "scale").edit(scores, cols)  # a v
    assert scaled.dtype == dtype and scaled.float().flatten().tolist() == [-2.0, 2.0, -6.0, 4.0, -2.5, 3.0]


def test_a_steer_refuses_cols_that_are_not_bool_and_values_that_are_not_one_per_sample():
    with pytest.raises(ValueError, match="one number per sample"):
        steer(value=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="must be bool"):
        steer(cols=torch.ones(2, 3))
    with pytest.raises(ValueError, match="kind"):
        steer(kind="add")
    with pytest.raises(ValueError, match="steps"):
        steer(steps="first")
