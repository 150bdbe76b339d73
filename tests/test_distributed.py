"""lmms-eval's data-parallel sharding (accelerate launch, 2 CPU processes) gives the results of one process."""

import medvqa_fixtures as fx
import pytest
from cli import FEW_TOKENS, run_lmms_eval
from fixtures import write_coco, write_vgmed_v1


def test_two_processes_give_the_same_results(tmp_path, llava_dir):
    env = {
        **fx.all_sources(tmp_path / "data"),
        "LMMS_VG_VGMED_ROOT": str(write_vgmed_v1(tmp_path / "vgmed")),
        "LMMS_VG_COCO_ROOT": str(write_coco(tmp_path / "coco")),
    }
    args = f"pretrained={llava_dir},device=cpu"
    one, _ = run_lmms_eval(tmp_path / "one", "huatuo", args, "vgmed_loc,pmc_vqa,omnimedvqa", env, FEW_TOKENS)
    two, _ = run_lmms_eval(tmp_path / "two", "huatuo", args, "vgmed_loc,pmc_vqa,omnimedvqa", env, FEW_TOKENS, processes=2)
    for task in ("pmc_vqa", "omnimedvqa"):
        assert two["results"][task]["accuracy,none"] == one["results"][task]["accuracy,none"]
        assert two["results"][task]["samples,none"] == one["results"][task]["samples,none"]
    for metric in ("kl_by_layer", "ar_by_layer", "js_by_layer"):
        assert two["results"]["vgmed_loc"][f"{metric},none"] == pytest.approx(one["results"]["vgmed_loc"][f"{metric},none"], rel=1e-5)
    assert two["results"]["vgmed_loc"]["samples,none"] == one["results"]["vgmed_loc"]["samples,none"]
