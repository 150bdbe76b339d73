"""VQA loaders on fixtures in each source's published schema, and the medvqa group through the CLI."""

import json
import math

import medvqa_fixtures as fx
import pytest
from cli import run_lmms_eval

from lmms_vg import medvqa, vqa_results


@pytest.fixture
def sources(tmp_path, monkeypatch):
    env = fx.all_sources(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def as_list(docs):
    return [dict(d) for d in docs]


def test_vqa_rad_and_pathvqa_parquet(sources):
    closed = as_list(medvqa.closed_docs("vqa_rad"))
    assert [d["answer"] for d in closed] == ["yes", "no", "yes"] and all(d["options"] == ["yes", "no"] for d in closed)
    assert medvqa.load_image(closed[0]).size == (64, 48)
    assert [d["answer"] for d in as_list(medvqa.open_docs("vqa_rad"))] == ["left lobe"]
    assert len(as_list(medvqa.closed_docs("pathvqa"))) == 2 and len(as_list(medvqa.open_docs("pathvqa"))) == 1


def test_slake_json_and_zip(sources):
    closed = medvqa.closed_docs("slake")
    assert [d["id"] for d in closed] == ["slake_11", "slake_12", "slake_13"]  # English closed only
    assert closed[0]["options"] == ["yes", "no"] and closed[0]["answer"] == "no" and closed[0]["category"] == "Abnormality"
    assert "without options" in closed[1]["vg_error"]  # "Left": closed but no options in this source
    assert medvqa.load_image(closed[2]).size == (64, 48)  # from inside imgs.zip
    assert [d["answer"] for d in medvqa.open_docs("slake")] == ["Liver"]


def test_pmc_vqa_csv_and_zip(sources):
    docs = medvqa.pmc_vqa()
    assert docs[0]["options"] == ["MRI", "CT", "X-ray", "Ultrasound"] and docs[0]["answer"] == "CT"
    assert docs[1]["answer"] == "Left kidney"
    assert medvqa.load_image(docs[0]).size == (64, 48)
    assert "not in" in docs[2]["vg_error"]


def test_omnimedvqa_local(sources):
    docs = medvqa.omnimedvqa()
    assert len(docs) == 5 and docs[1]["options"] == ["OCT", "Fundus", "X-ray", "CT"]
    assert docs[0]["category"] == "CT(Computed Tomography)"


def test_omnimedvqa_missing_root_names_the_setting(monkeypatch):
    monkeypatch.delenv("LMMS_VG_OMNIMEDVQA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="LMMS_VG_OMNIMEDVQA_ROOT"):
        medvqa.omnimedvqa()


def test_mmmu_configs(sources):
    docs = as_list(medvqa.closed_docs("mmmu_med"))
    assert len(docs) == 5  # one multiple-choice item with an image per subject; open items dropped
    assert docs[0]["options"] == ["Heart", "Liver", "Kidney"] and docs[0]["answer"] == "Liver"
    assert "<image 1>" not in docs[0]["question"] and {d["category"] for d in docs} == set(medvqa.MMMU_SUBJECTS)


def test_bundle_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_VG_MEDVQA_SOURCE", "bundle")
    monkeypatch.setenv("LMMS_VG_MEDVQA_BUNDLE", str(fx.bundle(tmp_path / "bundle")))
    assert [d["answer"] for d in medvqa.closed_docs("slake")] == ["Lung"]
    omni = medvqa.closed_docs("omnimedvqa")
    assert omni[0]["category"] == "MR" and medvqa.load_image(omni[0]).size == (64, 48)


def test_outcomes_report_and_exclude_bad_items():
    good = {"id": "1", "benchmark": "b", "category": "CT", "options": ["x", "y"], "answer": "y", "vg_error": ""}
    bad_answer = {**good, "id": "2", "answer": "z"}
    no_options = {**good, "id": "3", "options": []}
    outs = [
        vqa_results.closed_outcome(good, "B"),
        vqa_results.closed_outcome(bad_answer, "A"),
        vqa_results.closed_outcome(no_options, "A"),
        vqa_results.closed_outcome(good, json.dumps({"lmms_vg_error": "image 'x.png' not found"})),
    ]
    assert outs[0]["correct"] is True and outs[0]["pred"] == "B" and outs[0]["gold"] == "B" and outs[0]["match"] == "letter"
    assert [o["correct"] for o in outs[1:]] == [None, None, None]
    assert vqa_results.accuracy(outs) == 100.0
    counts = vqa_results.counts(outs)
    assert counts["scored"] == 1 and counts["excluded"] == 3


def test_medvqa_group_through_cli(tmp_path, llava_dir):
    env = fx.all_sources(tmp_path / "data")
    results, folder = run_lmms_eval(tmp_path, "huatuo", f"pretrained={llava_dir},device=cpu", "medvqa,medvqa_open", env)
    r = results["results"]
    expected_scored = {"vqa_rad": 3, "slake_closed": 2, "pathvqa": 2, "pmc_vqa": 2, "omnimedvqa": 2, "mmmu_med": 5}
    weighted, total = 0.0, 0
    for task, n in expected_scored.items():
        counts = r[task]["samples,none"]
        assert counts["scored"] == n, (task, counts)
        acc = r[task]["accuracy,none"]
        assert 0 <= acc <= 100
        samples = [json.loads(line) for line in next(folder.glob(f"*samples_{task}.jsonl")).read_text().splitlines()]
        logged = [s["accuracy"] for s in samples]
        assert acc == pytest.approx(100 * sum(o["correct"] for o in logged if o["correct"] is not None) / n)
        assert all("pred" in o and "gold" in o and "match" in o for o in logged if o["correct"] is not None)
        weighted += acc * len(samples)
        total += len(samples)
    assert r["omnimedvqa"]["samples,none"]["excluded"] == 3  # answer not among options, missing image, no options
    assert set(r["omnimedvqa"]["breakdown,none"]) == {"CT(Computed Tomography)", "Fundus Photography"}
    assert set(r["mmmu_med"]["breakdown,none"]) == set(medvqa.MMMU_SUBJECTS)
    assert set(r["slake_closed"]["breakdown,none"]) == {"Abnormality", "Organ"}
    assert r["medvqa"]["accuracy,none"] == pytest.approx(weighted / total)  # sample-weighted average
    assert math.isfinite(r["vqa_rad_open"]["bleu1,none"]) and "unavailable" in r["vqa_rad_open"]["bertscore,none"]
