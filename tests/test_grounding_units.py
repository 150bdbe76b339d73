"""One grounding record and one saved map file, field by field: what each sample's record counts, why a sample is
skipped (named with its id), and what the map file holds, with the image shrunk to 336 px at most."""

import numpy as np
import pytest
from lmms_eval.models import get_model
from PIL import Image

from lmms_vg.grounding import GroundingRunner, GroundingSample


@pytest.fixture(scope="module")
def adapter(llava_dir):
    return get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {}).adapter


def test_records_count_boxes_and_clipping_and_skips_name_their_samples(adapter, images):
    runner = GroundingRunner(adapter)
    assert runner.passes.cache.size == 64 and GroundingRunner(adapter, reference_cache_size=2).passes.cache.size == 2
    samples = [
        GroundingSample(images[0], "Where?", [[10, 10, 60, 50], [-5, 0, 20, 20]], "xyxy", sample_id="two"),
        GroundingSample(images[1], "Where?", [[10, 10, float("nan"), 50]], "xyxy", sample_id="nan-box"),
        GroundingSample(images[1], "Where?", [], "xyxy", sample_id="no-box"),
    ]
    two, bad, none = runner.score(samples)
    assert (two.n_boxes, two.n_clipped, two.zero_reference_layers, two.exif_orientation, two.skipped) == (2, 1, 0, 0, None)
    assert len(two.kl) == adapter.model.config.text_config.num_hidden_layers and not np.isnan(two.kl).any()
    assert bad.skipped.startswith("malformed box: ") and bad.skipped.endswith("(nan-box)")
    assert none.skipped == "no box (no-box)"


def test_a_saved_map_file_holds_the_shrunk_image_and_typed_fields(adapter, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()  # an empty folder of its own is fine
    big = Image.new("RGB", (672, 448), (40, 80, 120))
    runner = GroundingRunner(adapter, save_maps=folder)
    runner.score([GroundingSample(big, "Where?", [[100, 100, 300, 200]], "xyxy", sample_id="case 1/a.b-c_d")])
    (path,) = folder.glob("*.npz")
    assert path.name == "case_1_a.b-c_d.npz"  # letters, digits and -_. kept; anything else "_"
    saved = np.load(path)
    assert saved["image"].shape == (224, 336, 3) and saved["image_size"].tolist() == [672, 448]
    assert saved["kept"].dtype == bool and saved["kept"].shape == (0,)  # no knockout: nothing kept
    assert saved["knockout_layers"].dtype == np.int64 and saved["knockout_layers"].shape == (0,)
    maps = saved["maps"].astype(np.float32)
    assert maps.shape[0] == adapter.model.config.text_config.num_hidden_layers
    assert np.allclose(maps.max(-1), 1.0, atol=1e-3)  # each layer scaled to a maximum of 1
    small = Image.new("RGB", (200, 100))
    runner.score([GroundingSample(small, "Where?", [[10, 10, 50, 50]], "xyxy", sample_id="small")])
    assert np.load(folder / "small.npz")["image"].shape == (100, 200, 3)  # under 336 px: as it is


def test_a_clipped_box_is_warned_about_once_per_run(adapter, images, caplog):
    runner = GroundingRunner(adapter)
    clipped = [GroundingSample(images[i % 2], "Where?", [[-5, 0, 20, 20]], "xyxy", sample_id=f"c{i}") for i in range(3)]
    runner.score(clipped[:2])
    runner.score(clipped[2:])
    assert caplog.text.count("reaches outside the image") == 1 and "sample c0" in caplog.text


def test_grounding_under_a_knockout_saves_what_it_kept_and_measures_the_knocked_maps(adapter, images, tmp_path):
    from lmms_vg.methods.vgrefine import VGRefineConfig

    config = VGRefineConfig(heads=((1, 0), (0, 1)), knockout_layers=(1,), top_k=2, percentile=30.0)
    sample = [GroundingSample(images[0], "Where is it?", [[10, 10, 60, 50]], "xyxy", sample_id="k")]
    plain = GroundingRunner(adapter).score(sample)[0]
    knocked_runner = GroundingRunner(adapter, knockout=config, save_maps=tmp_path / "maps")
    knocked = knocked_runner.score(sample)[0]
    kept = np.load(tmp_path / "maps" / "k.npz")["kept"]
    n = adapter.image_tokens(images[0])
    assert kept.dtype == bool and kept.shape == (n,) and 0 < kept.sum() < n
    assert knocked_runner.kept.shape == (1, n)
    assert np.load(tmp_path / "maps" / "k.npz")["knockout_layers"].tolist() == [1]
    assert plain.kl[0] == pytest.approx(knocked.kl[0]) and plain.kl[-1] != pytest.approx(knocked.kl[-1])  # from layer 1 on


def test_grounding_without_a_reference_measures_the_raw_maps(adapter, images):
    """Normalisation off (no generic prompt): every layer and head is measured on the question's own maps, none is
    undefined, and the values are not the normalised ones."""
    sample = GroundingSample(images[0], "Where?", [[10, 10, 60, 50]], "xyxy", sample_id="raw")
    (raw,) = GroundingRunner(adapter, reference_prompt=None, head_level=True).score([sample])
    (normalised,) = GroundingRunner(adapter, head_level=True).score([sample])
    config = adapter.model.config.text_config
    assert raw.skipped is None and raw.zero_reference_layers == 0
    assert np.isfinite(raw.kl).all() and np.isfinite(raw.ar).all() and len(raw.kl) == config.num_hidden_layers
    head_kl = np.asarray(raw.head_kl)
    assert head_kl.shape == (config.num_hidden_layers, config.num_attention_heads) and np.isfinite(head_kl).all()
    assert not np.allclose(raw.kl, normalised.kl)


def test_map_files_in_a_new_nested_folder_hold_float16_maps_and_every_box(adapter, images, tmp_path):
    """``save_maps`` names a folder two levels down that does not exist yet; a sample id with no usable character is saved
    as ``sample``; maps and question maps are float16, each layer scaled to a maximum of 1; boxes are an (n, 4) array."""
    folder = tmp_path / "a" / "b"
    runner = GroundingRunner(adapter, save_maps=folder)
    runner.score([GroundingSample(images[0], "Where?", [[10, 10, 60, 50], [0, 0, 30, 20]], "xyxy", sample_id="")])
    saved = np.load(folder / "sample.npz")
    assert saved["maps"].dtype == np.float16 and saved["question_maps"].dtype == np.float16
    for name in ("maps", "question_maps"):
        layers = saved[name].astype(np.float32)
        assert layers.shape[0] == adapter.model.config.text_config.num_hidden_layers
        assert np.allclose(layers.max(-1), 1.0, atol=1e-3) and not np.allclose(layers.max(0), 1.0, atol=1e-3)
    assert saved["boxes"].dtype == np.float64 and saved["boxes"].tolist() == [[10, 10, 60, 50], [0, 0, 30, 20]]
