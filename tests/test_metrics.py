"""Grounding metrics against scipy and hand-computed values."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from lmms_vg import metrics


def test_attention_ratio_by_hand():
    maps = torch.tensor([[1.0, 3.0, 0.0, 4.0]])  # sum 8, mean 2
    box = torch.tensor([False, True, False, True])  # inside 7, |B| 2
    assert metrics.attention_ratio(maps, box).item() == pytest.approx(7 / (2 * 2 + 1e-8))
    uniform = torch.ones(1, 4)
    assert metrics.attention_ratio(uniform, box).item() == pytest.approx(1.0)


def test_kl_matches_scipy_entropy():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 16))
    box = np.zeros(16, dtype=bool)
    box[[2, 3, 7]] = True
    ours = metrics.kl_to_box(torch.from_numpy(maps), torch.from_numpy(box)).numpy()
    for idx in np.ndindex(3, 5):
        p = np.clip(maps[idx] / maps[idx].sum(), 1e-12, 1)
        g = np.clip(box / box.sum(), 1e-12, 1)
        # scipy renormalises its inputs; the clipped G sums to 1 + 13e-12, so compare on that scale
        expected = entropy(g, p) * g.sum() + g.sum() * np.log(g.sum() / p.sum())
        assert ours[idx] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_js_matches_scipy_jensenshannon():
    rng = np.random.default_rng(1)
    maps = rng.random((4, 25))
    box = np.zeros(25, dtype=bool)
    box[5:10] = True
    ours = metrics.js_to_box(torch.from_numpy(maps), torch.from_numpy(box)).numpy()
    for i in range(4):
        expected = jensenshannon(maps[i] / maps[i].sum(), box / box.sum()) ** 2
        assert ours[i] == pytest.approx(expected, abs=1e-6)


def test_iou_by_hand():
    maps = torch.tensor([0.9, 0.8, 0.1, 0.0, 0.7])
    box = torch.tensor([True, False, False, False, True])  # top-2 = {0, 1}; box {0, 4}: 1 / 3
    assert metrics.attention_iou(maps, box).item() == pytest.approx(1 / 3)


def test_perfect_and_degenerate_cases():
    box = torch.tensor([True, True, False, False])
    perfect = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert metrics.kl_to_box(perfect, box).item() == pytest.approx(0.0, abs=1e-9)
    assert metrics.js_to_box(perfect, box).item() == pytest.approx(0.0, abs=1e-7)
    assert metrics.attention_iou(perfect, box).item() == 1.0
    assert metrics.attention_ratio(perfect, box).item() == pytest.approx(2.0)
    whole = torch.ones(4, dtype=torch.bool)  # a box over the whole image: AR is exactly 1 whatever the map
    assert metrics.attention_ratio(torch.rand(3, 4), whole) == pytest.approx(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no image token"):
        metrics.kl_to_box(perfect, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        metrics.attention_ratio(perfect, torch.ones(3, dtype=torch.bool))


def test_reference_normalisation():
    q = torch.tensor([0.2, 0.4])
    ref = torch.tensor([0.1, 0.0])
    out = metrics.normalise_by_reference(q, ref)
    assert out[0].item() == pytest.approx(2.0)
    assert out[1].item() == pytest.approx(0.4 / 1e-10)


def test_kl_floor_for_a_box_cell_with_almost_no_attention():
    """A box cell holding 1e-20 of the attention: P is floored at 1e-12 there (the authors' clip), so KL stays finite and
    equals the hand-computed sum with the floor; unclipped it would be about 21 nats larger."""
    import math

    maps = torch.tensor([[0.5, 1e-20, 0.5 - 1e-20, 0.0]])
    box = torch.tensor([True, True, False, False])
    p = [0.5, 1e-12]  # the box cells' P after the floor
    expected = sum(0.5 * math.log(0.5 / q) for q in p)
    assert metrics.kl_to_box(maps, box).item() == pytest.approx(expected, rel=1e-6)


def test_a_box_given_as_zeros_and_ones_is_a_mask():
    maps = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    as_ints = metrics.attention_ratio(maps, [0, 1, 1, 0])
    assert as_ints.item() == pytest.approx(metrics.attention_ratio(maps, torch.tensor([False, True, True, False])).item())
    assert as_ints.item() == pytest.approx(0.5 / ((1.0 / 4) * 2 + 1e-8))
