"""Grounding maps with a shared image prefix against eager attention on each full prompt."""

import json

import pytest
import torch
from cli import run_lmms_eval
from fixtures import write_coco, write_vgmed_v1
from test_engine import eager_attentions, llava_batch, load_llava

from lmms_vg import geometry, metrics
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.grounding import GroundingRunner, GroundingSample
from lmms_vg.prompts import GENERIC_PROMPT

QUESTIONS = ["Where is the liver?", "Which side of this image shows the largest round lesion?"]


def eager_last_row(model, processor, image, text):
    inputs = llava_batch(processor, [image], [text])
    cols = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    return torch.stack([a[0, :, -1, cols] for a in eager_attentions(model, inputs)])  # [L, H, N]


def test_runner_metrics_equal_eager_reference(llava_dir, images):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    runner = GroundingRunner(adapter, reference_prompt=GENERIC_PROMPT, head_level=True)
    boxes = [[[10, 10, 60, 50]], [[50, 50, 90, 95], [0, 0, 20, 20]]]
    samples = [
        GroundingSample(img, q, b, "xyxy", image_key=str(i), sample_id=str(i))
        for i, (img, q, b) in enumerate(zip(images, QUESTIONS, boxes))
    ]
    records = runner.score(samples)
    for s, rec in zip(samples, records):
        q = eager_last_row(model, processor, s.image, s.question)
        ref = eager_last_row(model, processor, s.image, GENERIC_PROMPT)
        layer = q.mean(1) / (ref.mean(1) + 1e-10)
        box = torch.from_numpy(geometry.box_cells(s.boxes, "xyxy", adapter.transform(s.image)).mask)
        assert rec.kl == pytest.approx(metrics.kl_to_box(layer, box).tolist(), rel=1e-4)
        assert rec.ar == pytest.approx(metrics.attention_ratio(layer, box).tolist(), rel=1e-4)
        assert rec.js == pytest.approx(metrics.js_to_box(layer, box).tolist(), rel=1e-4)
        heads = q / (ref + 1e-10)
        assert torch.tensor(rec.head_kl) == pytest.approx(metrics.kl_to_box(heads, box), rel=1e-4)
    # second pass: the reference maps come from the per-image cache and give the same numbers
    again = runner.score(samples)
    for a, b in zip(again, records):
        assert a.kl == pytest.approx(b.kl, rel=1e-6)
    assert len(runner.passes.cache._items) == 2


def test_zero_area_box_is_skipped_with_reason(llava_dir, images):
    model, processor = load_llava(llava_dir)
    runner = GroundingRunner(LlavaAdapter(model, processor))
    rec = runner.score([GroundingSample(images[0], "Where?", [[500, 500, 600, 600]], "xyxy")])[0]
    assert rec.skipped and "zero area" in rec.skipped and rec.n_clipped == 1


def test_vgmed_tasks_through_lmms_eval_cli(tmp_path, llava_dir):
    env = {"LMMS_VG_VGMED_ROOT": str(write_vgmed_v1(tmp_path / "vgmed")), "LMMS_VG_COCO_ROOT": str(write_coco(tmp_path / "coco"))}
    maps_dir = tmp_path / "maps"
    results, folder = run_lmms_eval(
        tmp_path, "huatuo", f"pretrained={llava_dir},device=cpu,head_level=true,save_maps={maps_dir}", "vgmed", env
    )
    n_layers = 3
    for task, n_scored, n_skipped in (("vgmed_loc", 3, 1), ("vgmed_attr", 2, 0), ("vgmed_coco_loc", 2, 0), ("vgmed_coco_attr", 2, 0)):
        r = results["results"][task]
        for metric in ("ar_by_layer", "kl_by_layer", "js_by_layer", "iou_by_layer"):
            assert len(r[f"{metric},none"]) == n_layers, (task, metric)
        best = r["best_layer,none"]
        assert best["kl"] == min(r["kl_by_layer,none"]) and best["layer"] == r["kl_by_layer,none"].index(best["kl"])
        assert r["samples,none"]["scored"] == n_scored and r["samples,none"]["skipped"] == n_skipped
        assert len(r["head_kl,none"]) == n_layers and len(r["head_kl,none"][0]) == 4
    loc = results["results"]["vgmed_loc"]["samples,none"]
    assert loc["skip_reasons"] == {"box has zero area inside the image": 1} and loc["clipped_boxes"] == 1
    logged = [json.loads(line) for line in next(folder.glob("*samples_vgmed_loc.jsonl")).read_text().splitlines()]
    assert len(logged) == 4 and all(len(s["kl_by_layer"]["kl"]) in (0, n_layers) for s in logged)
    record = logged[0]["kl_by_layer"]  # per-layer numbers, not whole maps (the run record names the maps' folder)
    assert all(len(v) <= n_layers for v in record.values() if isinstance(v, list)) and record["run"]["maps"] == str(maps_dir)
    saved = sorted(maps_dir.glob("*.npz"))
    assert len(saved) == 9
    import numpy as np

    for path in saved:
        with np.load(path) as z:
            assert z["maps"].dtype == np.float16 and z["maps"].shape == (n_layers, 64)
            assert np.isfinite(z["maps"]).all() and np.allclose(z["maps"].max(1), 1.0)


def test_missing_image_root_names_the_variable(tmp_path, llava_dir):
    root = write_vgmed_v1(tmp_path / "vgmed")
    (root / "imgs" / "101" / "source.jpg").unlink()
    env = {"LMMS_VG_VGMED_ROOT": str(root)}
    with pytest.raises(AssertionError, match="LMMS_VG_SKIP_MISSING_IMAGES"):
        run_lmms_eval(tmp_path, "huatuo", f"pretrained={llava_dir},device=cpu", "vgmed_loc", env)
    results, _ = run_lmms_eval(
        tmp_path, "huatuo", f"pretrained={llava_dir},device=cpu", "vgmed_loc", {**env, "LMMS_VG_SKIP_MISSING_IMAGES": "1"}
    )
    counts = results["results"]["vgmed_loc"]["samples,none"]
    assert counts["skipped"] == 3 and counts["scored"] == 1  # two questions on the missing image, one zero-area box


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "I", "F"])
def test_any_image_mode_becomes_8bit_rgb(mode):
    import numpy as np
    from PIL import Image

    from lmms_vg.adapters import rgb

    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((ramp * 4000 + 100).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        assert img.mode == mode
    else:
        img = Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)
    out = rgb(img)
    arr = np.asarray(out)
    assert out.mode == "RGB" and out.size == (64, 48)
    assert arr[0, 0].max() <= 1 and arr[-1, -1].min() >= 250 or mode in ("P", "LA", "RGBA")  # full range kept for deep images
    assert arr[-1, -1].sum() > arr[0, 0].sum()


def test_vgmed_layouts_as_published(tmp_path, monkeypatch):
    """The authors' current layout (xyxy, Slake images xywh, bbox or original_bboxes), v1 under both names, COCO both ways."""
    from fixtures import write_coco_current, write_vgmed_current

    from lmms_vg import vgmed_data

    monkeypatch.setenv("LMMS_VG_VGMED_ROOT", str(write_vgmed_current(tmp_path / "current")))
    docs = vgmed_data.vgmed_docs("localization")
    assert [d["vg_boxes"] for d in docs] == [
        [[10.0, 20.0, 40.0, 60.0]],  # Slake image: xywh
        [[40.0, 10.0, 100.0, 60.0]],  # other sources: xyxy as written
        [[5.0, 50.0, 45.0, 90.0], [50.0, 60.0, 80.0, 120.0]],  # from original_bboxes
    ]
    assert docs[1]["vg_image_path"] == str(tmp_path / "current" / "BraTS2021_00012_slice77.png")
    assert len(vgmed_data.vgmed_docs("attribute")) == 1

    v1 = write_vgmed_v1(tmp_path / "v1")
    monkeypatch.setenv("LMMS_VG_VGMED_ROOT", str(v1))
    first = vgmed_data.vgmed_docs("localization")[0]
    assert first["vg_boxes"] == [[10.0, 20.0, 40.0, 60.0]] and first["vg_image_path"].endswith("imgs/101/source.jpg")
    for kind in ("localization", "attribute"):  # the same bytes published as SLAKE_*_questions.jsonl
        (v1 / f"VGMED_{kind}_questions.jsonl").rename(v1 / f"SLAKE_{kind}_questions.jsonl")
    assert vgmed_data.vgmed_docs("localization")[0]["vg_boxes"] == [[10.0, 20.0, 40.0, 60.0]]

    images, annotations = write_coco_current(tmp_path / "val2014", tmp_path / "coco_annotations")
    monkeypatch.setenv("LMMS_VG_COCO_ROOT", str(images))
    monkeypatch.setenv("LMMS_VG_COCO_ANNOTATIONS", str(annotations))
    coco = vgmed_data.vgmed_docs("localization", natural=True)
    assert coco[0]["vg_boxes"] == [[5.0, 5.0, 45.0, 55.0]] and coco[0]["vg_image_path"] == str(images / "COCO_val2014_000000000139.jpg")
    monkeypatch.delenv("LMMS_VG_COCO_ANNOTATIONS")
    monkeypatch.setenv("LMMS_VG_COCO_ROOT", str(write_coco(tmp_path / "coco_v1")))
    assert vgmed_data.vgmed_docs("localization", natural=True)[0]["vg_boxes"] == [[5.0, 5.0, 45.0, 55.0]]

    monkeypatch.setenv("LMMS_VG_VGMED_LAYOUT", "current")  # insisting on a layout that is not there names the files looked for
    with pytest.raises(FileNotFoundError, match="VGMED_localization.jsonl"):
        vgmed_data.vgmed_docs("localization")


def test_qwen_max_pixels_caps_the_grid(qwen2_vl_dir):
    """The authors' Qwen grounding setting: max_pixels=50176 (at most 64 tokens of 28x28 px); the geometry follows it."""
    from conftest import random_image
    from lmms_eval.models import get_model

    wrapper = get_model("qwen25vl").create_from_arg_string(f"pretrained={qwen2_vl_dir},device=cpu,max_pixels=50176,min_pixels=784", {})
    image = random_image(600, 400)
    grid = wrapper.adapter.pixel_inputs([image])["image_grid_thw"][0]
    t = wrapper.adapter.transform(image)
    assert (t.rows, t.cols) == (int(grid[1]) // 2, int(grid[2]) // 2)
    assert t.rows * t.cols * 28 * 28 <= 50176 and t.rows * t.cols > 16
    with pytest.raises(ValueError, match="Qwen2-VL-family"):
        get_model("huatuo").create_from_arg_string(f"pretrained={qwen2_vl_dir},device=cpu,max_pixels=50176", {})


def test_shared_prefix_holds_the_full_prompts_tokens_bos_included(tmp_path, images):
    """A tokenizer that adds BOS (Llama, Mistral): prefix + suffix is the full prompt's token list, BOS and all."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoProcessor

    from lmms_vg.demo import tiny

    checkpoint = tiny.build_llava(tmp_path / "bos", family="llama")
    processor = AutoProcessor.from_pretrained(checkpoint)
    bos = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    processor.tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    model, _ = load_llava(checkpoint)
    adapter = LlavaAdapter(model, processor)
    full = adapter.encode(images[:1], ["Where is it?"])["input_ids"][0].tolist()
    split = adapter.split_prompts(images[:1], ["Where is it?"])
    assert full[0] == bos and split.prefix[0] + split.suffix[0] == full
