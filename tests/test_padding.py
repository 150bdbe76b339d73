"""Pad-to-square happens for real, whatever processor class a checkpoint ships, and boxes land where the geometry says.

Per model id and per image-processor class it may meet (CLIP, LLaVA's own with and without
``do_pad``, Qwen2-VL), a white marker rectangle is drawn on wide, tall and square images; the
wrapper's adapter prepares the pixels, and the cells the marker lands in (read from the pixels)
must be the cells the adapter's geometry gives for the marker's box.
"""

import shutil

import numpy as np
import pytest
from lmms_eval.models import get_model
from markers import frame, landed_cells, marker_image, white_extent
from transformers import AutoProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from lmms_vg import geometry
from lmms_vg.presets import PRESETS

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
SHAPE = {"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 112}, "image_mean": MEAN, "image_std": STD}
PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(**SHAPE),  # llava-hf style conversions: resize + centre crop, no do_pad
    "llava_nopad": lambda: LlavaImageProcessorPil(do_pad=False, **SHAPE),
    "llava_pad": lambda: LlavaImageProcessorPil(do_pad=True, **SHAPE),
    "qwen2_vl": lambda: Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
    "qwen3_vl": lambda: Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128),  # Qwen3-VL's 16-pixel patches
}
QWEN = ("qwen2_vl", "qwen3_vl")
# (width, height, marker box xyxy): wide (the 337x113), tall and square; one marker off-centre, one central
IMAGES = [
    (337, 113, (250, 20, 320, 90)),
    (337, 113, (150, 40, 190, 80)),
    (113, 337, (20, 260, 90, 320)),
    (200, 200, (30, 120, 90, 180)),
]
CASES = [
    (mid, proc)
    for mid, preset in sorted(PRESETS.items())
    if mid != "lmms_vg_demo" and preset.family in ("llava", "qwen2_vl")  # the processor classes these families meet; every family's
    # own processor: tests/test_conformance.py
    for proc in (
        ("qwen3_vl",) if mid == "qwen3vl" else ("qwen2_vl",) if preset.family == "qwen2_vl" else ("clip", "llava_nopad", "llava_pad")
    )
]


@pytest.fixture(scope="module")
def checkpoint_with(llava_dir, qwen2_vl_dir, qwen3_vl_dir, tmp_path_factory):
    """The tiny checkpoint of the family, its image processor replaced by the class under test."""

    def make(proc: str):
        base = {"qwen2_vl": qwen2_vl_dir, "qwen3_vl": qwen3_vl_dir}.get(proc, llava_dir)
        out = tmp_path_factory.mktemp(proc)
        shutil.copytree(base, out, dirs_exist_ok=True)
        if proc in QWEN:  # saved as its parts (the full processor needs torchvision)
            PROCESSORS[proc]().save_pretrained(out)
            return out
        processor = AutoProcessor.from_pretrained(base)  # LLaVA: the image processor lives inside processor_config.json
        processor.image_processor = PROCESSORS[proc]()
        processor.save_pretrained(out)
        return out

    return {proc: make(proc) for proc in PROCESSORS}


@pytest.mark.parametrize(("model_id", "proc"), CASES)
def test_marker_lands_in_the_cells_the_geometry_gives(model_id, proc, checkpoint_with):
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={checkpoint_with[proc]},device=cpu", {})
    adapter = wrapper.adapter
    assert type(adapter.processor.image_processor).__name__ == type(PROCESSORS[proc]()).__name__
    padded = PRESETS[model_id].pad_to_square
    for width, height, box in IMAGES:
        image = marker_image(width, height, box)
        pixels = frame(adapter, image)
        t = adapter.transform(image)
        cell = pixels.shape[1] // t.rows  # the model frame's cells (the geometry's frame may be another, e.g. fetch_image's)
        assert pixels.shape[1:] == (t.rows * cell, t.cols * cell)
        cells = geometry.box_cells([box], "xyxy", t).mask
        landed = landed_cells(pixels, cell)
        where = f"{model_id} with {proc}, {width}x{height} image, marker {box}"
        if not cells.any():  # the crop removed the marker: then no white may be left either
            assert not landed.any(), where
            continue
        assert landed.any(), where
        assert not (landed & ~cells).any(), f"{where}: marker outside the geometry's cells"
        # the geometry's mapped box matches the white pixels' extent to interpolation blur (under a pixel or two)
        x0, y0, x1, y1 = box
        fx, fy = cell / t.cell, cell / t.cell_h  # the geometry's frame to the model's
        mapped = (
            (x0 * t.scale_x + t.offset_x) * fx,
            (y0 * t.scale_y + t.offset_y) * fy,
            (x1 * t.scale_x + t.offset_x) * fx,
            (y1 * t.scale_y + t.offset_y) * fy,
        )
        frame_w, frame_h = t.cols * cell, t.rows * cell
        mapped = (max(mapped[0], 0), max(mapped[1], 0), min(mapped[2], frame_w), min(mapped[3], frame_h))
        extent = white_extent(pixels)
        assert np.allclose(extent, mapped, atol=2.0), f"{where}: white pixels at {extent}, geometry says {mapped}"
    if padded and proc not in QWEN:  # padding really happened: a wide image keeps its full width in the frame
        wide = frame(adapter, marker_image(337, 113, (0, 0, 337, 113)))
        assert white_extent(wide)[0] <= 1 and white_extent(wide)[2] >= 111


@pytest.mark.parametrize("proc", ["clip", "llava_nopad"])
def test_padding_uses_the_processors_mean_colour(proc, checkpoint_with):
    """LLaVA-1.5's expand2square fills with the processor's mean colour: those pixels normalise to zero."""
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={checkpoint_with[proc]},device=cpu", {})
    pixels = frame(wrapper.adapter, marker_image(337, 113, (0, 0, 337, 113)), raw=False)
    # the top rows of the 112x112 frame are padding (the image occupies rows ~37..75)
    assert np.abs(pixels[:, :30]).max() < 0.02
