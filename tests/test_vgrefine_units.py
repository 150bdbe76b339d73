"""VGRefine's settings and head rankings one field at a time: a ranking file as calibration writes it (every field, and
the fields a hand-written file may leave out), the bounds on heads, layers and the percentile at their edges, and the
ranking's order where heads tie."""

import dataclasses
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


# ---------------------------------------------------------------- settings from --model_args


def ranking_file(tmp_path, heads, layers=None, percentile=None, name="ranking.json"):
    record = {"heads": heads} | ({"knockout_layers": layers} if layers is not None else {})
    record |= {"percentile": percentile} if percentile is not None else {}
    path = tmp_path / name
    path.write_text(json.dumps(record))
    return str(path)


def test_vgrefine_settings_from_model_args_field_by_field(tmp_path):
    from lmms_vg.methods.vgrefine import VGRefine
    from lmms_vg.prompts import GENERIC_PROMPT, SHORT_ANSWER

    three = ranking_file(tmp_path, [[1, 0], [0, 1], [1, 1]], layers=[1])
    defaults = {"model": "huatuo", "heads": three, "knockout_layers": (0,)}
    assert VGRefine.settings_from_args({}, defaults) == VGRefineConfig(
        heads=((1, 0), (0, 1), (1, 1)), knockout_layers=(1,), top_k=3, percentile=50.0, mode="mask"
    )  # the ranking's layers over the preset's, K = every head it lists (fewer than 20), the paper's percentile
    given = {"top_k": "2", "percentile": "30", "knockout_layers": "0,2", "knockout_mode": "zero"}
    config = VGRefine.settings_from_args(given, defaults)
    assert (config.selected, config.knockout_layers, config.percentile, config.mode) == (((1, 0), (0, 1)), (0, 2), 30.0, "zero")
    assert config.reference_prompt == GENERIC_PROMPT + SHORT_ANSWER
    bare = ranking_file(tmp_path, [[1, 0]], name="bare.json")
    assert VGRefine.settings_from_args({"heads": bare}, defaults).knockout_layers == (0,)  # neither names layers: the preset's
    assert VGRefine.settings_from_args({}, defaults | {"normalise": False}).reference_prompt is None
    many = ranking_file(tmp_path, [[i // 8, i % 8] for i in range(25)], layers=[3], percentile=40, name="many.json")
    config = VGRefine.settings_from_args({"heads": many}, defaults)
    assert (config.top_k, config.percentile) == (20, 40.0)  # the paper's K; the ranking's own percentile
    with pytest.raises(ValueError, match="top_k=0 must be at least 1"):
        VGRefine.settings_from_args({"top_k": "0"}, defaults)
    with pytest.raises(ValueError, match="percentile='half'"):
        VGRefine.settings_from_args({"percentile": "half"}, defaults)
    with pytest.raises(VGRefineConfigError, match="vgrefine: unknown settings \\['alpha'\\]"):
        VGRefine.settings_from_args({"alpha": "1"}, defaults)
    with pytest.raises(ValueError, match="^model: VGRefine needs heads="):
        VGRefine.settings_from_args({}, {})
    with pytest.raises(ValueError, match="^medgemma: VGRefine needs heads="):  # the preset's model named
        VGRefine.settings_from_args({}, {"model": "medgemma"})


def test_config_from_args_normalises_by_default(tmp_path):
    from lmms_vg.methods.vgrefine import config_from_args

    config = config_from_args("m", ranking_file(tmp_path, [[0, 0]], layers=[1]), None, None, None, "mask")
    assert config.reference_prompt and config.mode == "mask"


def test_a_config_records_what_it_used():
    config = VGRefineConfig(heads=((1, 0), (0, 1)), knockout_layers=(2,), top_k=1, percentile=30.0, mode="zero", reference_prompt="P")
    assert config.settings() == {
        "heads": [[1, 0]],
        "top_k": 1,
        "percentile": 30.0,
        "knockout_layers": [2],
        "mode": "zero",
        "reference_prompt": "P",
    }


@pytest.mark.parametrize(
    ("content", "at"),
    [({"heads": [[1.5, 0]]}, "1.5"), ({"heads": [[0, 2.5]]}, "2.5"), ({"heads": [[0, 0]], "knockout_layers": [0.5]}, "0.5")],
)
def test_a_fractional_index_names_its_file(tmp_path, content, at):
    path = ranking_file(tmp_path, content["heads"], layers=content.get("knockout_layers"))
    with pytest.raises(VGRefineConfigError, match=f"heads file '{path}': {at} is not a layer or head index"):
        load_heads(path)


def test_calibration_ranks_an_undefined_head_last():
    """A head with no defined KL (null in a results file) is ranked after every defined one."""
    ranking = calibrate([[None, 0.5], [0.2, 0.1]], top_k=4, knockout_layers=(1,), model="m", source="s", samples=2)
    assert ranking.heads == ((1, 1), (1, 0), (0, 1), (0, 0)) and np.isnan(ranking.scores[-1])


# ---------------------------------------------------------------- VGRefine as a method


def test_vgrefine_answers_say_which_reference_prompt_they_used_and_keep_its_cache(llava_dir, images):
    import torch
    from test_engine import QUESTIONS, load_llava

    from lmms_vg.families.llava import LlavaAdapter
    from lmms_vg.methods import Asked
    from lmms_vg.methods.vgrefine import VGRefine, VGRefiner

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = VGRefineConfig(heads=((1, 0), (0, 1)), knockout_layers=(1,), top_k=2, percentile=30.0, reference_prompt="Describe it.")
    assert VGRefine(adapter, config).refiner.passes.cache.size == 64
    assert VGRefiner(adapter, config).passes.cache.size == 64
    with pytest.raises(VGRefineConfigError, match="^tiny-llava has 3 layers"):
        adapter.name = "tiny-llava"
        VGRefiner(adapter, dataclasses.replace(config, heads=((5, 0),), top_k=1))
    method = VGRefine(adapter, config, reference_cache_size=4)
    assert method.refiner.passes.cache.size == 4
    kwargs = {"max_new_tokens": 2, "do_sample": False}
    pair = [[images[0]], [images[1]]]
    own = method.answer(Asked(pair, list(QUESTIONS[:2]), ["a", "b"], list(QUESTIONS[:2])), **kwargs)
    assert own.details == [{"reference_prompt": "Describe it."}] * 2
    assert len(method.refiner.passes.cache._items) == 2  # each keyed image's reference maps kept
    direct = method.refiner.generate([images[0], images[1]], list(QUESTIONS[:2]), **kwargs)
    assert [f["knocked_fraction"] for f in own.answer_fields] == [round(f, 6) for f in direct.knocked_fraction]
    assert all(f["knockout_layers"] == (1,) for f in own.answer_fields)
    assert [r.tolist() for r in own.tokens] == direct.tokens.tolist()
    tasks = method.answer(Asked(pair, list(QUESTIONS[:2]), [None, None], list(QUESTIONS[:2]), reference_prompt="Where?"), **kwargs)
    assert tasks.details == [{"reference_prompt": "Where?"}] * 2  # the task's generic prompt over the method's
    keyed = method.answer(Asked(pair, list(QUESTIONS[:2]), ["c", "d"], list(QUESTIONS[:2]), reference_prompt="Where?"), **kwargs)
    assert keyed.details == tasks.details and {k[:2] for k in method.refiner.passes.cache._items} == {
        ("a", "Describe it."),
        ("b", "Describe it."),
        ("c", "Where?"),
        ("d", "Where?"),
    }  # the triage normalised by the prompt the answer names
    unnormalised = VGRefine(adapter, dataclasses.replace(config, reference_prompt=None))
    plain = unnormalised.answer(Asked(pair, list(QUESTIONS[:2]), [None, None], list(QUESTIONS[:2]), reference_prompt="Where?"), **kwargs)
    assert plain.details == [{"reference_prompt": None}] * 2  # normalisation off: no prompt, whatever the task names
    raw = unnormalised.refiner.generate([images[0], images[1]], list(QUESTIONS[:2]), reference_prompt="Where?", **kwargs)
    none = unnormalised.refiner.generate([images[0], images[1]], list(QUESTIONS[:2]), reference_prompt=None, **kwargs)
    assert torch.equal(raw.keep, none.keep)
    normalised = method.refiner.generate([images[0], images[1]], list(QUESTIONS[:2]), reference_prompt="Where?", **kwargs)
    assert not torch.equal(normalised.keep, none.keep)  # the test tells the two apart


def test_checked_against_the_loaded_model_by_its_name():
    from types import SimpleNamespace

    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2)
    adapter = SimpleNamespace(name="tiny-llava", model=SimpleNamespace(config=SimpleNamespace(text_config=text)))
    with pytest.raises(VGRefineConfigError, match="^tiny-llava has 2 layers x 2 heads"):
        VGRefineConfig(heads=((2, 0),), knockout_layers=(1,), top_k=1).check(adapter)


def test_the_triage_keeps_what_lies_at_or_above_the_percentile_exactly():
    """203 distinct values: the 100th percentile keeps the top one only, the 0th all, the 50th the upper half and the median."""
    import torch

    from lmms_vg.methods.vgrefine import triage_keep

    values = torch.arange(203.0)[None]
    assert [int(triage_keep(values, p).sum()) for p in (100.0, 0.0, 50.0)] == [1, 203, 102]
