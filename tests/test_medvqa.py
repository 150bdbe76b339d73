"""VQA loaders on fixtures in each source's published schema, and the medvqa group through the CLI."""

import json
import math

import medvqa_fixtures as fx
import pytest
import torch
from cli import run_lmms_eval

from lmms_vg import outputs, vqa_data, vqa_results


@pytest.fixture
def sources(tmp_path, monkeypatch):
    env = fx.all_sources(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def as_list(docs):
    return [dict(d) for d in docs]


def test_vqa_rad_and_pathvqa_parquet(sources):
    closed = as_list(vqa_data.closed_docs("vqa_rad"))
    assert [d["answer"] for d in closed] == ["yes", "no", "yes"] and all(d["options"] == ["yes", "no"] for d in closed)
    assert [im.size for im in vqa_data.load_images(closed[0])] == [(64, 48)]
    assert [d["answer"] for d in as_list(vqa_data.open_docs("vqa_rad"))] == ["left lobe"]
    assert len(as_list(vqa_data.closed_docs("pathvqa"))) == 2 and len(as_list(vqa_data.open_docs("pathvqa"))) == 1


def test_slake_json_and_zip(sources):
    closed = vqa_data.closed_docs("slake")
    # English closed only; "Left" (qid 12) cannot be multiple choice from this source: left out before the model sees it
    assert [d["id"] for d in closed] == ["slake_11", "slake_13"]
    assert closed[0]["options"] == ["yes", "no"] and closed[0]["answer"] == "no" and closed[0]["category"] == "Abnormality"
    assert vqa_data.left_out(closed) == {"closed item without options in this source": 1}
    assert [im.size for im in vqa_data.load_images(closed[1])] == [(64, 48)]  # from inside imgs.zip
    assert [d["answer"] for d in vqa_data.open_docs("slake")] == ["Liver"]


def test_pmc_vqa_csv_and_zip(sources):
    docs = vqa_data.pmc_vqa()
    assert docs[0]["options"] == ["MRI", "CT", "X-ray", "Ultrasound"] and docs[0]["answer"] == "CT"
    assert docs[1]["answer"] == "Left kidney"
    assert [im.size for im in vqa_data.load_images(docs[0])] == [(64, 48)]
    assert "not in" in docs[2]["vg_error"]


def test_omnimedvqa_local(sources):
    docs = vqa_data.omnimedvqa()
    assert len(docs) == 5 and docs[1]["options"] == ["OCT", "Fundus", "X-ray", "CT"]
    assert docs[0]["category"] == "CT(Computed Tomography)"


def test_omnimedvqa_missing_root_names_the_setting(monkeypatch):
    monkeypatch.delenv("LMMS_VG_OMNIMEDVQA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="LMMS_VG_OMNIMEDVQA_ROOT"):
        vqa_data.omnimedvqa()


def test_mmmu_configs_every_image_in_order(sources):
    docs = as_list(vqa_data.closed_docs("mmmu_med"))
    assert len(docs) == 5  # one multiple-choice item with an image per subject; open items dropped
    assert docs[0]["options"] == ["Heart", "Liver", "Kidney"] and docs[0]["answer"] == "Liver"
    assert {d["category"] for d in docs} == set(vqa_data.MMMU_SUBJECTS)
    two = next(d for d in docs if d["category"] == "Clinical_Medicine")
    # both images, image_1 first; the text keeps its <image k> references, as HuatuoGPT-Vision's eval sends them
    assert [im.size for im in vqa_data.load_images(two)] == [(64, 48), (40, 30)]
    assert two["question"] == "Compare <image 1> with <image 2>. Which structure changed?"
    assert "<image 1>" in docs[0]["question"]


def test_bundle_in_its_published_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_VG_MEDVQA_SOURCE", "bundle")
    monkeypatch.setenv("LMMS_VG_MEDVQA_BUNDLE", str(fx.bundle(tmp_path / "bundle")))
    assert [d["answer"] for d in vqa_data.closed_docs("vqa_rad")] == ["yes"]
    slake = vqa_data.closed_docs("slake")
    assert [d["answer"] for d in slake] == ["Lung", "?"]  # '?' stays: the published scorer counts it wrong
    omni = vqa_data.closed_docs("omnimedvqa")
    assert [d["category"] for d in omni] == ["Optical Coherence Tomography", "Fundus Photography"]  # from `subset`
    assert omni[1]["options"] == ["Retina", "Lung", "Liver"]  # a string holding a list is parsed, not split into characters
    mmmu = vqa_data.closed_docs("mmmu_med")
    assert mmmu[0]["category"] == "Clinical_Medicine" and mmmu[0]["answer"] == "The lesion grew"
    assert [im.size for im in vqa_data.load_images(mmmu[0])] == [(40, 30), (30, 40)]
    assert {d["item_set"] for d in slake + omni + mmmu} == {"paper"}


def test_options_strings():
    assert vqa_data.parse_options("['a', 'b, c']") == (["a", "b, c"], "")
    assert vqa_data.parse_options(["a", 1]) == (["a", "1"], "")
    options, error = vqa_data.parse_options("A, B")
    assert options == [] and "not a list" in error


def test_outcomes_report_and_exclude_bad_items():
    good = {"id": "1", "benchmark": "b", "category": "CT", "options": ["x", "y"], "answer": "y", "vg_error": ""}
    bad_answer = {**good, "id": "2", "answer": "z"}
    no_options = {**good, "id": "3", "options": []}
    outs = [
        vqa_results.closed_outcome(good, "B"),
        vqa_results.closed_outcome(bad_answer, "A"),
        vqa_results.closed_outcome(no_options, "A"),
        vqa_results.closed_outcome(good, outputs.encode(outputs.SampleError("image 'x.png' not found"))),
    ]
    assert outs[0].correct is True and outs[0].pred == "B" and outs[0].gold == "B" and outs[0].match == "letter"
    assert [o.correct for o in outs[1:]] == [None, None, None]
    assert vqa_results.accuracy(outs) == 100.0
    counts = vqa_results.counts(outs)
    assert counts["scored"] == 1 and counts["excluded"] == 3


def test_medvqa_group_through_cli(tmp_path, llava_dir):
    env = fx.all_sources(tmp_path / "data")
    results, folder = run_lmms_eval(tmp_path, "huatuo", f"pretrained={llava_dir},device=cpu", "medvqa,medvqa_open", env)
    r = results["results"]
    expected_scored = {"vqa_rad": 3, "slake_closed": 2, "pathvqa": 2, "pmc_vqa": 2, "omnimedvqa": 2, "mmmu_med": 5}
    weighted, total, by_docs, docs = 0.0, 0, 0.0, 0
    for task, n in expected_scored.items():
        counts = r[task]["samples,none"]
        assert counts["scored"] == n, (task, counts)
        acc = r[task]["accuracy,none"]
        assert 0 <= acc <= 100
        samples = [json.loads(line) for line in next(folder.glob(f"*samples_{task}.jsonl")).read_text().splitlines()]
        logged = [s["accuracy"] for s in samples]
        assert acc == pytest.approx(100 * sum(o["correct"] for o in logged if o["correct"] is not None) / n)
        assert all("pred" in o and "gold" in o and "match" in o for o in logged if o["correct"] is not None)
        weighted, total = weighted + acc * n, total + n
        by_docs, docs = by_docs + acc * len(samples), docs + len(samples)
        assert counts["item_set"] == vqa_data.HF_ITEM_SETS[task.removesuffix("_closed")]
        assert results["configs"][task]["generation_kwargs"]["max_new_tokens"] == 256  # HuatuoGPT-Vision's eval: no answer cut short
    omni = r["omnimedvqa"]["samples,none"]
    # answer not among the options and no options: left out before the run; the missing image: sent, excluded, reported
    assert (omni["total"], omni["excluded"], omni["left_out_before_run"]) == (3, 1, 2)
    assert r["slake_closed"]["samples,none"]["left_out_reasons"] == {"closed item without options in this source": 1}
    assert set(r["omnimedvqa"]["breakdown,none"]) == {"CT(Computed Tomography)", "Fundus Photography"}
    assert set(r["mmmu_med"]["breakdown,none"]) == set(vqa_data.MMMU_SUBJECTS)
    assert set(r["slake_closed"]["breakdown,none"]) == {"Abnormality", "Organ"}
    # the paper's Avg.: weighted by the items each benchmark scored, not by its docs
    assert r["medvqa"]["accuracy,none"] == pytest.approx(weighted / total)
    if weighted / total != pytest.approx(by_docs / docs):  # the two weightings differ on these fixtures unless all accuracies agree
        assert r["medvqa"]["accuracy,none"] != pytest.approx(by_docs / docs)
    assert math.isfinite(r["vqa_rad_open"]["bleu1,none"]) and "unavailable" in r["vqa_rad_open"]["bertscore,none"]


def test_wrapper_sends_every_image_in_order(llava_dir, monkeypatch):
    """A two-image item: two placeholders before the text (HuatuoGPT-Vision's order), both images' pixels, in order."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {"batch_size": 2})
    first, second = fx.img(1, (90, 60)), fx.img(2, (50, 80))
    wrapper.task_dict = {"t": {"test": [{"images": [first, second]}, {"images": [second]}]}}
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return kwargs["input_ids"][:, :1].repeat(1, kwargs["input_ids"].shape[1] + 1)

    monkeypatch.setattr(wrapper.model, "generate", spy)
    text = "Compare <image 1> with <image 2>."
    reqs = [
        Instance(
            "generate_until", (q, {"max_new_tokens": 1}, lambda d: d["images"], i, "t", "test"), i, {"task": "t", "doc_id": i, "repeats": 1}
        )
        for i, q in enumerate([text, "One image."])
    ]
    wrapper.generate_until(reqs)
    adapter = wrapper.adapter
    per_image = adapter.image_tokens(first)
    ids = seen["input_ids"]
    assert [int((row == adapter.image_token_id).sum()) for row in ids] == [2 * per_image, per_image]
    expected = adapter.pixel_inputs([first, second, second])["pixel_values"]
    assert torch.equal(seen["pixel_values"], expected)  # item 0's two images in order, then item 1's
    decoded = adapter.tokenizer.decode(ids[0][ids[0] != adapter.image_token_id], skip_special_tokens=False)
    assert "<image 1>" in decoded and "<image 2>" in decoded  # references stay text, as in the original eval


def test_vgrefine_answers_a_multi_image_item_without_knockout_and_says_so(llava_dir, tmp_path):
    """The knockout is defined for one image: a two-image item is answered plainly, its log saying so; a one-image item is refined."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[1, 0], [1, 2]], "knockout_layers": [2]}))
    wrapper = get_model("lmms_vg_llava_vgrefine").create_from_arg_string(
        f"pretrained={llava_dir},device=cpu,heads={heads}", {"batch_size": 2}
    )
    wrapper.task_dict = {"t": {"test": [{"images": [fx.img(1), fx.img(2)]}, {"images": [fx.img(3)]}]}}
    reqs = [
        Instance(
            "generate_until",
            (q, {"max_new_tokens": 2, "lmms_vg": {}}, lambda d: d["images"], i, "t", "test"),
            i,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, q in enumerate(["Compare <image 1> with <image 2>.", "One image."])
    ]
    two, one = (json.loads(out) for out in wrapper.generate_until(reqs))
    assert two["vgrefine"].startswith("not applied: 2 images") and two["knocked_fraction"] is None
    assert one["knockout_layers"] == [2] and 0 < one["knocked_fraction"] < 1
    outcome = vqa_results.closed_outcome({"id": "x", "benchmark": "mmmu_med", "options": ["a", "b"], "answer": "a"}, json.dumps(two))
    assert outcome.to_log()["vgrefine"].startswith("not applied") and outcome.output == two["text"]  # kept in the per-sample log
