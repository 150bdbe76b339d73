"""VGRefine's settings and head rankings one field at a time: a ranking file as calibration writes it (every field, and
the fields a hand-written file may leave out), the bounds on heads, layers and the percentile at their edges, and the
ranking's order where heads tie."""

import json

import numpy as np
import pytest

from lmms_vg.methods.vgrefine import HeadRanking, VGRefineConfig, VGRefineConfigError, calibrate, load_heads, shipped_heads


def test_a_ranking_is_written_as_calibration_writes_it_and_read_back_whole(tmp_path):
    ranking = HeadRanking(((2, 1), (0, 3)), (1, 2), "huatuo", "vgmed_coco_loc", 12, (0.5, 0.75), percentile=30.0)
    text = ranking.to_json()
    assert text == (
        '{\n "model": "huatuo",\n "source": "vgmed_coco_loc",\n "samples": 12,\n "knockout_layers": [\n  1,\n  2\n ],\n'
        ' "heads": [\n  [\n   2,\n   1\n  ],\n  [\n   0,\n   3\n  ]\n ],\n "mean_kl": [\n  0.5,\n  0.75\n ],\n "percentile": 30.0\n}'
    )
    path = tmp_path / "ranking.txt"  # any existing file is a ranking file, whatever its suffix
    path.write_text(text)
    assert load_heads(str(path)) == ranking
    plain = HeadRanking(((1, 0),), (1,))
    assert "percentile" not in json.loads(plain.to_json())
    path.write_text(plain.to_json())
    assert load_heads(str(path)).percentile is None


def test_a_hand_written_ranking_may_name_its_heads_only(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"heads": [[1, 0], [0.0, 2]]}')
    assert load_heads(str(path)) == HeadRanking(heads=((1, 0), (0, 2)), knockout_layers=(), model="", source="", samples=None, scores=())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"heads": [[-1, 0]]}, "negative layer or head"),
        ({"heads": [[0, -1]]}, "negative layer or head"),
        ({"heads": [[0, 1]], "knockout_layers": [-1]}, "negative layer or head"),
        ({"heads": [[True, 1]]}, "True is not a layer or head index"),
        ({"heads": [["2", 1]]}, "'2' is not a layer or head index"),
    ],
)
def test_ranking_files_with_impossible_indices_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(VGRefineConfigError, match=message):
        load_heads(str(path))
    path.write_text(json.dumps({"heads": [[0, 0]], "knockout_layers": [0]}))  # index 0 is a layer
    assert load_heads(str(path)).knockout_layers == (0,)


def test_a_missing_json_file_is_named_as_a_file_and_shipped_names_load():
    with pytest.raises(VGRefineConfigError, match="heads file 'nope.json' not found"):
        load_heads("nope.json")
    names = shipped_heads()
    assert "huatuo_7b" in names and all(not n.endswith(".json") for n in names)
    for name in names:
        assert load_heads(name).heads


@pytest.mark.parametrize(("percentile", "ok"), [(0.0, True), (100.0, True), (-0.5, False), (100.5, False)])
def test_the_percentile_takes_its_whole_closed_range(percentile, ok):
    make = lambda: VGRefineConfig(heads=((0, 0),), knockout_layers=(1,), top_k=1, percentile=percentile)
    if ok:
        assert make().percentile == percentile
    else:
        with pytest.raises(VGRefineConfigError, match="outside \\[0, 100\\]"):
            make()


@pytest.mark.parametrize(
    ("head", "layer", "message"),
    [
        ((3, 1), 3, None),
        ((0, 0), 0, None),
        ((4, 0), 1, "heads \\[\\[4, 0\\]\\] do not exist"),
        ((0, 2), 1, "heads \\[\\[0, 2\\]\\] do not exist"),
        ((1, 1), 4, "knockout_layers \\[4\\] out of range"),
    ],
)
def test_heads_and_layers_must_exist_in_the_model_up_to_its_last_index(head, layer, message):
    config = VGRefineConfig(heads=(head,), knockout_layers=(layer,), top_k=1)
    if message is None:
        config.validate_for(4, 2, "tiny")
    else:
        with pytest.raises(VGRefineConfigError, match=message):
            config.validate_for(4, 2, "tiny")


def test_calibration_ranks_tied_heads_in_reading_order():
    """28 x 28 heads with KL in quarter steps, so many tie: the ranking is by KL, ties by (layer, head), as a stable sort."""
    kl = (np.round(np.random.default_rng(0).random((28, 28)) * 4) / 4).tolist()
    ranking = calibrate(kl, top_k=40, knockout_layers=(3,), model="m", source="s", samples=5)
    expected = sorted((kl[layer][head], layer, head) for layer in range(28) for head in range(28))[:40]
    assert ranking.heads == tuple((layer, head) for _, layer, head in expected)
    assert ranking.scores == tuple(float(v) for v, _, _ in expected) and all(type(s) is float for s in ranking.scores)
