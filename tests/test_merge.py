"""`lmms-vg merge`: a demo run sharded by --offset/--limit, and run as two data-parallel processes, joins into the results of
the unsharded run; shards that overlap, leave items out or differ in settings are refused by name; `check` sees a clobbered
folder."""

import json
import shutil

import pytest
from cli import run_lmms_eval

from lmms_vg import cli
from lmms_vg.merge import MergeError, merge

TASKS = "medvqa_demo,vgmed_demo"  # 192 and 96 items
NEW_TOKENS = ["--gen_kwargs", "max_new_tokens=4"]


def results_of(folder) -> dict:
    (path,) = sorted(folder.rglob("*_results.json"))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    whole, _ = run_lmms_eval(tmp / "whole", "lmms_vg_demo", "device=cpu", TASKS, extra=NEW_TOKENS)
    shards = []
    for i, (offset, limit) in enumerate([(0, 32), (32, 32), (64, 128)]):  # every slice holds items of both tasks
        run_lmms_eval(
            tmp / f"shard{i}", "lmms_vg_demo", "device=cpu", TASKS, extra=[*NEW_TOKENS, "--offset", str(offset), "--limit", str(limit)]
        )
        shards.append(tmp / f"shard{i}" / "results")
    return tmp, whole, shards


def assert_same(merged: dict, whole: dict) -> None:
    for task in ("medvqa_demo", "vgmed_demo"):
        ours, theirs = merged["results"][task], whole["results"][task]
        assert set(ours) == set(theirs), task
        for key in theirs:
            if key.startswith(("kl_", "ar_", "js_", "iou_", "best_layer", "head_kl")):
                assert json.dumps(ours[key]) == json.dumps(theirs[key]) or ours[key] == pytest.approx(theirs[key], rel=1e-6), (task, key)
            else:
                assert ours[key] == theirs[key], (task, key)
        assert merged["n-samples"][task] == whole["n-samples"][task]


def test_offset_limit_shards_merge_into_the_unsharded_results(sharded):
    tmp, whole, shards = sharded
    written = merge(shards, tmp / "merged")
    merged = results_of(tmp / "merged")
    assert_same(merged, whole)
    assert merged["shards"] == 3 and len(written) == 3  # results and the two tasks' joined sample logs
    lines = [
        json.loads(x)
        for x in (written[0].parent / written[0].name.replace("_results.json", "_samples_medvqa_demo.jsonl")).read_text().splitlines()
    ]
    assert [x["doc_id"] for x in lines] == list(range(192))
    # the report and check read the merged folder like any other
    assert cli.main(["check", str(tmp / "merged"), "--tasks", TASKS]) == 0


def test_a_data_parallel_run_merges_into_the_same(sharded, tmp_path):
    _, whole, _ = sharded
    run_lmms_eval(tmp_path / "dp", "lmms_vg_demo", "device=cpu", TASKS, extra=NEW_TOKENS, processes=2)
    merge([tmp_path / "dp" / "results"], tmp_path / "merged")
    assert_same(results_of(tmp_path / "merged"), whole)


def test_overlapping_missing_and_mixed_shards_are_refused_by_name(sharded, tmp_path):
    _, _, shards = sharded
    with pytest.raises(MergeError, match="medvqa_demo: doc 0 is in two shards"):
        merge([shards[0], _copy(shards[0], tmp_path / "again"), shards[1], shards[2]], tmp_path / "a")
    with pytest.raises(MergeError, match=r"medvqa_demo: 32 of its 192 items are in no shard \(32-63\)"):
        merge([shards[0], shards[2]], tmp_path / "b")
    other = _copy(shards[1], tmp_path / "other")
    path = next(other.rglob("*_results.json"))
    data = json.loads(path.read_text())
    data["results"]["medvqa_demo"]["samples,none"]["run"]["settings"] = {"top_k": 3}
    data["results"]["vgmed_demo"]["samples,none"]["run"]["settings"] = {"top_k": 3}
    path.write_text(json.dumps(data))
    with pytest.raises(MergeError, match="the shards differ in run"):
        merge([shards[0], other, shards[2]], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def _copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_check_sees_a_clobbered_folder(sharded, tmp_path, capsys):
    """Two runs into one --output_path in the same second: one results file, a samples file with both runs' rows."""
    _, _, shards = sharded
    clobbered = _copy(shards[0], tmp_path / "clobbered")
    samples = next(clobbered.rglob("*_samples_medvqa_demo.jsonl"))
    other = next(shards[1].rglob("*_samples_medvqa_demo.jsonl"))
    samples.write_text(samples.read_text() + other.read_text() + samples.read_text().splitlines()[0] + "\n")
    assert cli.main(["check", str(clobbered), "--tasks", "medvqa_demo"]) == 2
    err = capsys.readouterr().err
    assert "its samples log has 65 rows for 32 results items, docs 0 twice: two runs wrote into" in err
