"""Report commands on results folders that the real lmms-eval CLI wrote in this test."""

import csv
import json
import xml.etree.ElementTree as ET

import medvqa_fixtures as fx
import pytest
from cli import FEW_TOKENS, run_lmms_eval
from fixtures import write_coco, write_vgmed_v1
from PIL import Image

from lmms_vg import cli, report


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llava_dir):
    """Head-level calibration run -> `lmms-vg calibrate` -> baseline and VGRefine runs with saved maps."""
    tmp = tmp_path_factory.mktemp("report")
    env = {
        **fx.all_sources(tmp / "data"),
        "LMMS_VG_VGMED_ROOT": str(write_vgmed_v1(tmp / "vgmed")),
        "LMMS_VG_COCO_ROOT": str(write_coco(tmp / "coco")),
    }
    base_args = f"pretrained={llava_dir},device=cpu"
    run_lmms_eval(tmp / "calib", "lmms_vg_llava", f"{base_args},head_level=true", "vgmed_coco_loc", env)
    heads = tmp / "heads.json"
    assert (
        cli.main(
            [
                "calibrate",
                str(tmp / "calib" / "results"),
                "--task",
                "vgmed_coco_loc",
                "--top-k",
                "4",
                "--knockout-layers",
                "1",
                "--out",
                str(heads),
            ]
        )
        == 0
    )
    tasks = "vgmed_loc,vgmed_coco_loc,pmc_vqa,omnimedvqa,mmmu_med"
    run_lmms_eval(tmp / "base", "lmms_vg_llava", f"{base_args},save_maps={tmp / 'maps_base'}", tasks, env, FEW_TOKENS)
    run_lmms_eval(tmp / "vg", "lmms_vg_llava_vgrefine", f"{base_args},heads={heads},save_maps={tmp / 'maps_vg'}", tasks, env, FEW_TOKENS)
    return tmp, heads


def test_calibration_file(runs):
    _, heads = runs
    preset = json.loads(heads.read_text())
    assert len(preset["heads"]) == 4 and preset["knockout_layers"] == [1] and preset["samples"] == 2
    assert preset["mean_kl"] == sorted(preset["mean_kl"]) and preset["source"].startswith("vgmed_coco_loc")


def test_leaderboard_tables(runs):
    tmp, _ = runs
    out = tmp / "report"
    assert cli.main(["leaderboard", str(tmp / "base" / "results"), str(tmp / "vg" / "results"), "--out", str(out)]) == 0
    rows = list(csv.reader((out / "leaderboard.csv").read_text().splitlines()))
    # each benchmark's own source, not the paper's item sets: the average says so; each figure has its interval beside it
    names = ["PMC-VQA", "OmniMedVQA", "MMMU H&M", "Avg. (not the paper's item sets)"]
    assert rows[0] == ["Model"] + [c for name in names for c in (name, f"{name} 95% CI")]
    labels = [r[0] for r in rows[1:]]
    assert len(labels) == 3 and labels[1].endswith("+ VGRefine") and labels[2].endswith("VGRefine - baseline")
    base, vg, delta = ([float(v.rstrip("*")) for v in r[1::2]] for r in rows[1:])
    assert delta == pytest.approx([b - a for a, b in zip(base, vg)], abs=0.11)  # every item paired: the same items
    results = json.loads(next((tmp / "base" / "results").rglob("*_results.json")).read_text())
    n = {t: results["results"][t]["samples,none"]["scored"] for t in ("pmc_vqa", "omnimedvqa", "mmmu_med")}
    acc = {t: results["results"][t]["accuracy,none"] for t in n}
    assert base[-1] == pytest.approx(sum(acc[t] * n[t] for t in n) / sum(n.values()), abs=0.051)  # weighted by items scored
    for row in rows[1:3]:  # Wilson intervals hold their accuracy
        for value, interval in zip(row[1::2], row[2::2]):
            low, high = (float(x) for x in interval.strip("[]").split(","))
            assert low <= float(value) <= high
    assert all(cell.startswith("[") for cell in rows[3][2::2])  # the delta's paired interval
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[0].startswith("| Model |") and md[5:7] == ["", "Item sets:"]
    assert md[8] == "- OmniMedVQA: OmniMedVQA open-access, every QA file, 2 items scored"
    paired = list(csv.reader((out / "deltas.csv").read_text().splitlines()))
    assert paired[0][:4] == ["Comparison", "Task", "Delta (points)", "95% CI low"] and len(paired) == 5  # three tasks and Avg.
    grounding = list(csv.reader((out / "grounding.csv").read_text().splitlines()))
    assert grounding[0][:6] == ["Model", "Task", "Layer", "Layer chosen", "AR", "AR 95% CI"]
    assert {r[3] for r in grounding[1:]} == {"best on these data"} and len(grounding) == 5  # the generic id names no layer


def test_layer_curves_and_heatmaps(runs):
    tmp, _ = runs
    out = tmp / "figures"
    assert cli.main(["curves", str(tmp / "base" / "results"), str(tmp / "vg" / "results"), "--out", str(out)]) == 0
    assert (
        cli.main(["heatmaps", "--baseline", str(tmp / "maps_base"), "--vgrefine", str(tmp / "maps_vg"), "--out", str(out), "--limit", "3"])
        == 0
    )
    for name in ("layer_curves", "heatmaps"):
        with Image.open(out / f"{name}.png") as img:
            assert img.width > 300 and img.height > 200
        assert ET.parse(out / f"{name}.svg").getroot().tag.endswith("svg")


def test_report_errors_are_clear(tmp_path, capsys):
    assert cli.main(["leaderboard", str(tmp_path)]) == 2
    assert "no lmms-eval results" in capsys.readouterr().err


def test_reports_merge_folders_and_name_unreadable_files(runs, capsys):
    """Grounding from one folder and VQA from another make one model's row; a corrupt file is named, the rest reported, exit 1."""
    tmp, _ = runs
    original = json.loads(next((tmp / "base" / "results").rglob("*_results.json")).read_text())
    for folder, keep in (("only_vqa", ("pmc_vqa", "omnimedvqa", "mmmu_med")), ("only_grounding", ("vgmed_loc", "vgmed_coco_loc"))):
        part = {**original, "results": {t: r for t, r in original["results"].items() if t in keep}}
        (tmp / folder / "m").mkdir(parents=True)
        (tmp / folder / "m" / "20260101_000000_results.json").write_text(json.dumps(part))
    (tmp / "broken").mkdir()
    (tmp / "broken" / "20260102_000000_results.json").write_text('{"results": {"pmc_vqa": ')
    out = tmp / "merged"
    code = cli.main(["leaderboard", str(tmp / "only_vqa"), str(tmp / "only_grounding"), str(tmp / "broken"), "--out", str(out)])
    assert code == 1 and "broken/20260102_000000_results.json" in capsys.readouterr().err
    rows = list(csv.reader((out / "leaderboard.csv").read_text().splitlines()))
    grounding = list(csv.reader((out / "grounding.csv").read_text().splitlines()))
    assert len(rows) == 2 and len(grounding) == 3 and rows[1][0] == grounding[1][0]  # one model, both tables
    assert float(rows[1][1]) == pytest.approx(original["results"]["pmc_vqa"]["accuracy,none"], abs=0.051)


def test_newest_file_wins_per_task(tmp_path):
    from lmms_vg import report

    def write(name, task, acc):
        data = {"config": {"model": "huatuo"}, "results": {task: {"accuracy,none": acc}}}
        (tmp_path / name).write_text(json.dumps(data))

    write("20260101_000000_results.json", "vqa_rad", 10.0)
    write("20260102_000000_results.json", "vqa_rad", 20.0)
    write("20260101_120000_results.json", "pathvqa", 30.0)
    (run,) = report.load_runs([tmp_path])
    assert run.results["vqa_rad"]["accuracy,none"] == 20.0 and run.results["pathvqa"]["accuracy,none"] == 30.0


def test_leaderboard_has_a_delta_row_per_method(tmp_path):
    """Baseline, VGRefine, PAI and AdaptVis runs of one model (results files as lmms-eval writes them): a delta row for each method."""
    acc = {"huatuo": (50.0, 40.0), "huatuo_vgrefine": (55.0, 41.0), "huatuo_pai": (52.0, 38.0), "huatuo_adaptvis": (49.0, 44.0)}
    for i, (model, (rad, pmc)) in enumerate(acc.items()):
        folder = tmp_path / model / "checkpoint"
        folder.mkdir(parents=True)
        results = {
            "results": {
                "vqa_rad": {"accuracy,none": rad, "samples,none": {"scored": 10, "item_set": "paper"}},
                "pmc_vqa": {"accuracy,none": pmc, "samples,none": {"scored": 30, "item_set": "paper"}},
            },
            "config": {"model": model, "model_args": "pretrained=checkpoint"},
            "n-samples": {"vqa_rad": {"original": 10, "effective": 10}, "pmc_vqa": {"original": 30, "effective": 30}},
        }
        (folder / f"20261124_00000{i}_results.json").write_text(json.dumps(results))
    header, rows = report.leaderboard(report.load_runs([tmp_path]))
    assert header == ["Model", "VQA-RAD", "VQA-RAD 95% CI", "PMC-VQA", "PMC-VQA 95% CI", "Avg.", "Avg. 95% CI"]
    assert [r[0] for r in rows] == [
        "huatuo",
        "huatuo + VGRefine",
        "huatuo + PAI",
        "huatuo + AdaptVis",
        "huatuo: VGRefine - baseline",
        "huatuo: PAI - baseline",
        "huatuo: AdaptVis - baseline",
    ]
    assert rows[5][1::2] == ["+2.0", "-2.0", "-1.0"]  # PAI: 52-50, 38-40, (52*10+38*30)/40 - (50*10+40*30)/40
    assert rows[6][1::2] == ["-1.0", "+4.0", "+2.8"]
    assert set(rows[5][2::2]) == {"n/a (no sample logs: rerun with --log_samples)"}  # no samples files here: no paired interval


def results_file(folder, name, model, task, acc, scored, run=None, model_args="") -> None:
    """A results file as lmms-eval writes it for an lmms-vg task: the run record beside the counts."""
    counts = {"scored": scored, **({"run": run} if run else {})}
    data = {"config": {"model": model, "model_args": model_args}, "results": {task: {"accuracy,none": acc, "samples,none": counts}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def test_runs_are_named_by_their_record_two_checkpoints_two_rows(tmp_path):
    """Two medgemma runs on other checkpoints than the id's are two rows named by their folders; the method and its settings come
    from the record (vgrefine=on on a plain id), never from model_args (which here says the opposite)."""
    own = {"model": "medgemma", "checkpoint": "google/medgemma-4b-it", "method": None, "settings": {}, "default_checkpoint": True}
    a = {**own, "checkpoint": "/ckpt/medgemma-ft-a", "default_checkpoint": False}
    b = {**own, "checkpoint": "/ckpt/medgemma-ft-b/", "default_checkpoint": False}
    refined = {**own, "method": "vgrefine", "settings": {"top_k": 20}}
    results_file(tmp_path / "1", "20260101_000000_results.json", "medgemma", "vqa_rad", 50.0, 10, own, "vgrefine=on")
    results_file(tmp_path / "2", "20260101_000001_results.json", "medgemma", "vqa_rad", 60.0, 10, a)
    results_file(tmp_path / "3", "20260101_000002_results.json", "medgemma", "vqa_rad", 70.0, 10, b)
    results_file(tmp_path / "4", "20260101_000003_results.json", "medgemma", "vqa_rad", 55.0, 10, refined, "vgrefine=off")
    runs = {r.label: r for r in report.load_runs([tmp_path])}
    assert set(runs) == {"medgemma", "medgemma [medgemma-ft-a]", "medgemma [medgemma-ft-b]", "medgemma + VGRefine"}
    assert runs["medgemma [medgemma-ft-b]"].results["vqa_rad"]["accuracy,none"] == 70.0
    assert runs["medgemma + VGRefine"].settings == {"top_k": 20} and runs["medgemma"].method is None


def test_a_failed_rerun_never_replaces_a_good_row_and_check_says_so(tmp_path, capsys):
    from lmms_vg.cli import main

    run = {"model": "huatuo", "checkpoint": "x", "method": None, "settings": {}, "default_checkpoint": True}
    results_file(tmp_path, "20260101_000000_results.json", "huatuo", "vqa_rad", 50.0, 10, run)
    results_file(tmp_path, "20260102_000000_results.json", "huatuo", "vqa_rad", float("nan"), 0, run)
    (found,) = report.load_runs([tmp_path])
    assert found.results["vqa_rad"]["accuracy,none"] == 50.0 and "vqa_rad" in found.failed
    assert "20260102_000000_results.json" in report.failed_notes([found])[0]
    assert main(["check", str(tmp_path), "--tasks", "vqa_rad"]) == 2
    assert "its newest results" in capsys.readouterr().err
    results_file(tmp_path, "20260103_000000_results.json", "huatuo", "vqa_rad", 60.0, 10, run)  # a good rerun replaces it
    (found,) = report.load_runs([tmp_path])
    assert found.results["vqa_rad"]["accuracy,none"] == 60.0 and not found.failed
