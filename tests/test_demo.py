"""The README's main job: the bundled demo, end to end, and what its numbers say."""

import csv
import json
import time
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from lmms_vg import cli, report


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    assert cli.main(["demo", "--out", str(out)]) == 0
    return out, time.time() - t0


def test_demo_writes_results_tables_and_figures(demo):
    out, seconds = demo
    print(f"\ndemo: {seconds:.0f}s on this machine")
    for model in ("lmms_vg_demo", "lmms_vg_demo_vgrefine", "lmms_vg_demo_pai", "lmms_vg_demo_adaptvis", "lmms_vg_demo_vicrop"):
        assert list((out / "results" / model).rglob("*_results.json")), model
    rows = list(csv.reader((out / "report" / "leaderboard.csv").read_text().splitlines()))
    assert rows[0] == ["Model", "medvqa_demo", "Avg."]
    methods = ("VGRefine", "PAI", "AdaptVis", "ViCrop")
    assert [r[0] for r in rows[1:]] == [
        "lmms_vg_demo",
        *(f"lmms_vg_demo + {m}" for m in methods),
        *(f"lmms_vg_demo: {m} - baseline" for m in methods),
    ]
    assert (out / "report" / "leaderboard.md").read_text().startswith("| Model | medvqa_demo | Avg. |")
    grounding = list(csv.reader((out / "report" / "grounding.csv").read_text().splitlines()))
    assert len(grounding) == 5  # two models x (task, control)
    for name in ("layer_curves", "heatmaps"):
        with Image.open(out / "report" / f"{name}.png") as img:
            img.verify()
        assert ET.parse(out / "report" / f"{name}.svg").getroot().tag.endswith("svg")


def test_grounding_metrics_tell_grounded_from_ungrounded(demo):
    """The trained demo model looks at the target: AR well above 1; with the box moved at random, AR near 1."""
    out, _ = demo
    run = next(r for r in report.load_runs([out / "results"]) if r.method is None)
    true_ar = max(run.results["vgmed_demo"]["ar_by_layer,none"])
    random_ar = run.results["vgmed_demo_random"]["ar_by_layer,none"]
    best = run.results["vgmed_demo"]["best_layer,none"]
    print(f"\nAR by layer, true boxes: {run.results['vgmed_demo']['ar_by_layer,none']}")
    print(f"AR by layer, random boxes: {random_ar}")
    print(f"best layer {best['layer']}: AR {best['ar']:.3f}, KL {best['kl']:.3f}, JS {best['js']:.3f}")
    assert true_ar > 2.0
    assert all(abs(a - 1) < (true_ar - 1) / 2 for a in random_ar)
    accuracy = run.results["medvqa_demo"]["accuracy,none"]
    print(f"demo VQA accuracy: {accuracy:.1f}%")
    assert json.dumps(run.results["medvqa_demo"]["samples,none"])


def test_a_failed_rerun_into_the_same_folder_fails_and_reports_nothing_stale(demo, tmp_path, monkeypatch, capsys):
    """Run again into the finished demo's folder with its tasks hidden: the command fails, and the old results are gone."""
    import shutil

    out, _ = demo
    again = tmp_path / "again"
    shutil.copytree(out, again)
    monkeypatch.setenv("LMMS_VG_AUTO_TASKS", "0")  # lmms-eval no longer finds the demo tasks: its run fails (and exits 0)
    assert cli.main(["demo", "--out", str(again)]) == 2
    assert "wrote no results for lmms_vg_demo" in capsys.readouterr().err
    assert not list((again / "results" / "lmms_vg_demo").rglob("*_results.json"))
