"""Real medical files and user mistakes, round two: nothing of the user's overwritten, nothing silently wrong.

Fixtures are written as their sources write them: an EXIF-rotated JPEG as a phone stores a portrait
shot (landscape pixels, orientation 6), a 16-bit greyscale PNG as CT and X-ray exports store 12-bit
values, a bundle JSON with a Latin-1 byte in it.
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from lmms_eval.models import get_model
from PIL import Image
from test_convert import original_checkpoint
from test_models import make_requests

from lmms_vg import cli, files, geometry, outputs, scoring, vqa_data, vqa_results
from lmms_vg.adapters import rgb
from lmms_vg.grounding import GroundingRunner, GroundingSample
from lmms_vg.methods import MethodConfigError
from lmms_vg.methods.vgrefine import VGRefineConfigError, load_heads


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- convert never loses the user's data


def test_convert_refuses_a_folder_of_the_users_and_its_own_source(tmp_path, capsys):
    original_checkpoint(tmp_path / "orig", tower_inside=True, pickle=False)
    source = folder_digest(tmp_path / "orig")
    assert cli.main(["convert", str(tmp_path / "orig"), str(tmp_path / "orig")]) == 2
    assert "is the source" in capsys.readouterr().err
    assert folder_digest(tmp_path / "orig") == source  # the original weights are untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "notes"}')
    assert cli.main(["convert", str(tmp_path / "orig"), str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds files lmms-vg did not write: config.json" in err and "--force" in err
    assert (mine / "config.json").read_text() == '{"my": "notes"}' and len(list(mine.iterdir())) == 1
    assert cli.main(["convert", str(tmp_path / "orig"), str(mine), "--force"]) == 0
    assert (mine / "model.safetensors").exists() and json.loads((mine / "config.json").read_text()).get("model_type") == "llava"


def test_convert_again_into_its_own_output_and_an_interrupted_one_leaves_nothing(tmp_path, monkeypatch):
    from lmms_vg import convert as conversion

    original_checkpoint(tmp_path / "orig", tower_inside=True, pickle=False)
    out = tmp_path / "hf"
    conversion.convert(tmp_path / "orig", out)
    conversion.convert(tmp_path / "orig", out)  # its own earlier output, unchanged: no --force needed
    first = folder_digest(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conversion.convert(tmp_path / "orig", tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        conversion.convert(tmp_path / "orig", out, force=True)
    assert not (tmp_path / "fresh").exists() and folder_digest(out) == first
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]  # no half-written staging folder left behind


# ---------------------------------------------------------------- every command that writes


def write_results(root: Path) -> list[str]:
    """Results folders as lmms-eval writes them: a baseline and a VGRefine run, one VQA and one head-level grounding task."""
    grounding = {
        "ar_by_layer,none": [1.0, 1.2, 1.1],
        "kl_by_layer,none": [0.9, 0.7, 0.8],
        "js_by_layer,none": [0.3, 0.2, 0.25],
        "best_layer,none": {"layer": 1, "ar": 1.2, "kl": 0.7, "js": 0.2},
        "samples,none": {"scored": 4, "skipped": 0},
        "head_kl,none": [[0.9, 0.8], [0.5, 0.7], [0.6, 0.9]],
    }
    folders = []
    for i, model in enumerate(("huatuo", "huatuo_vgrefine")):
        folder = root / "results" / model / "checkpoint"
        folder.mkdir(parents=True)
        results = {
            "results": {"vqa_rad": {"accuracy,none": 50.0 + i, "samples,none": {"scored": 10}}, "vgmed_coco_loc": grounding},
            "config": {"model": model, "model_args": "pretrained=checkpoint"},
            "n-samples": {"vqa_rad": {"original": 10, "effective": 10}},
        }
        (folder / f"20261201_00000{i}_results.json").write_text(json.dumps(results))
        folders.append(str(root / "results" / model))
    return folders


def test_every_command_that_writes_refuses_the_users_files_without_force(tmp_path, capsys):
    results = write_results(tmp_path)
    cases = {
        "leaderboard": (["leaderboard", *results], "leaderboard.md"),
        "report": (["report", *results], "leaderboard.csv"),
        "curves": (["curves", *results], "layer_curves.png"),
    }
    for name, (args, clash) in cases.items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / clash).write_text("my own file")
        assert cli.main([*args, "--out", str(out)]) == 2, name
        assert clash in capsys.readouterr().err
        assert (out / clash).read_text() == "my own file" and len(list(out.iterdir())) == 1, name  # nothing moved in
        assert cli.main([*args, "--out", str(out), "--force"]) == 0, name
        assert (out / clash).read_bytes() != b"my own file"
        assert cli.main([*args, "--out", str(out)]) == 0, name  # its own files, unchanged: a run again replaces them
    heads = tmp_path / "heads.json"
    heads.write_text("mine")
    assert cli.main(["calibrate", *results, "--knockout-layers", "1", "--out", str(heads)]) == 2
    assert heads.read_text() == "mine" and "exists" in capsys.readouterr().err


def test_heatmaps_and_the_demo_refuse_the_users_files(tmp_path, capsys, llava_dir, images):
    out = tmp_path / "demo"
    (out / "report").mkdir(parents=True)
    (out / "report" / "leaderboard.md").write_text("my table")
    assert cli.main(["demo", "--out", str(out)]) == 2  # refused before any run
    assert "report/leaderboard.md" in capsys.readouterr().err and not (out / "results").exists()
    maps = tmp_path / "maps"
    adapter = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {}).adapter
    GroundingRunner(adapter, save_maps=maps).score([GroundingSample(images[0], "Where?", [[10, 10, 60, 50]], "xyxy", sample_id="s")])
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "heatmaps.png").write_bytes(b"mine")
    code = cli.main(["heatmaps", "--baseline", str(maps), "--out", str(tmp_path / "fig")])
    assert code == 2 and (tmp_path / "fig" / "heatmaps.png").read_bytes() == b"mine"


def test_a_folder_written_inside_another_commands_output_is_known_as_lmms_vgs(tmp_path):
    """The demo writes its browser with ``browse`` into ``report/browser``, which keeps its own list: a run again clears
    those files as lmms-vg's own, and a file of the user's beside them still stops it."""
    from lmms_vg import writing

    out = tmp_path / "demo"
    with writing.staged(out / "report", what="lmms-vg demo") as stage:
        (stage / "leaderboard.md").write_text("table")
    with writing.staged(out / "report" / "browser", what="lmms-vg browse") as stage:
        (stage / "chunks").mkdir()
        (stage / "index.html").write_text("<html>")
        (stage / "chunks" / "c00000.js").write_text("var c = 0;")
    writing.clear_own(out, ["report"], what="lmms-vg demo")  # all of it lmms-vg's: removed
    assert sorted(p.name for p in (out / "report").rglob("*") if p.is_file()) == [writing.MANIFEST, writing.MANIFEST]
    assert all(json.loads(p.read_text()) == {} for p in (out / "report").rglob(writing.MANIFEST))  # nothing listed that is gone
    with writing.staged(out / "report" / "browser", what="lmms-vg browse") as stage:
        (stage / "index.html").write_text("<html>")
    (out / "report" / "browser" / "notes.txt").write_text("mine")
    (out / "report" / "browser" / "index.html").write_text("<html> edited by hand")
    with pytest.raises(writing.OwnedFileError, match="browser/index.html, report/browser/notes.txt"):
        writing.clear_own(out, ["report"], what="lmms-vg demo")
    assert (out / "report" / "browser" / "notes.txt").read_text() == "mine"


def test_save_maps_refuses_a_folder_of_the_users(tmp_path, llava_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scan_001.npz").write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds files lmms-vg did not write"):
        get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu,save_maps={mine}", {})
    assert (mine / "scan_001.npz").read_bytes() == b"precious"


# ---------------------------------------------------------------- silently wrong, no more


def phone_jpeg(path: Path) -> tuple[int, int, int, int]:
    """A portrait shot as a phone stores it: landscape pixels (120x80) and EXIF orientation 6 (turn 90 degrees clockwise to
    display, 80x120). A white lesion; returns its box on the displayed image, as an annotator drew it."""
    stored = np.zeros((80, 120, 3), dtype=np.uint8)
    stored[10:30, 70:110] = 255  # rows 10..30, columns 70..110 of the stored frame
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    # displayed = stored turned 90 degrees clockwise: stored (row r, col c) -> displayed (x = 79 - r, y = c)
    return 80 - 30, 70, 80 - 10, 110


def test_an_exif_rotated_jpeg_is_seen_and_boxed_as_displayed(tmp_path, llava_dir):
    box = phone_jpeg(tmp_path / "portrait.jpg")
    image = files.open_image(tmp_path / "portrait.jpg")
    assert image.size == (80, 120) and image.info[files.ROTATED] == 6
    lesion = np.asarray(image.convert("L"))[box[1] : box[3], box[0] : box[2]]
    assert lesion.mean() > 200  # the lesion is where the box was drawn
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {})
    adapter = wrapper.adapter
    t = adapter.transform(image)
    cells = geometry.box_cells([box], "xyxy", t).mask
    frame = adapter.pixel_inputs([image])["pixel_values"][0].float().numpy()
    cell = frame.shape[1] // t.rows
    white = (frame[0] > 1.5).reshape(t.rows, cell, t.cols, cell).max(axis=(1, 3)).reshape(-1)
    assert white.any() and not (white & ~cells).any()  # every lesion pixel the model sees lies in the box's cells
    record = GroundingRunner(adapter).score([GroundingSample(image, "Where is the lesion?", [box], "xyxy", sample_id="p")])[0]
    assert record.skipped is None and record.exif_orientation == 6
    docs = [{"image": image, "question": "Where?", "vg_boxes": [box]}]
    wrapper.task_dict = {"t": {"test": docs}}
    (answer,) = wrapper.generate_until(make_requests(wrapper, [image], ["Where?"], {"max_new_tokens": 2, "lmms_vg": {}}))
    assert outputs.decode(answer).exif_orientation == [6]


def radiology_png(path: Path) -> None:
    """A 16-bit greyscale PNG as a CT or X-ray export writes it: 12-bit values (0..4095), a bright structure inside."""
    values = np.full((96, 128), 600, dtype=np.uint16)
    values[30:60, 40:90] = 3900
    Image.fromarray(values).save(path)  # uint16: PIL writes a 16-bit greyscale PNG


def test_a_16_bit_png_keeps_its_contrast_in_saved_maps_and_heatmaps(tmp_path, llava_dir):
    radiology_png(tmp_path / "ct.png")
    image = files.open_image(tmp_path / "ct.png")
    assert image.mode in ("I;16", "I")
    model_name = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {})
    runner = GroundingRunner(model_name.adapter, save_maps=tmp_path / "maps")
    runner.score([GroundingSample(image, "Where is the bone?", [[40, 30, 90, 60]], "xyxy", sample_id="ct")])
    thumb = np.load(tmp_path / "maps" / "ct.npz")["image"]
    assert thumb.max() == 255 and thumb.min() == 0 and (thumb == 255).mean() < 0.5  # rescaled, not clipped to white
    assert cli.main(["heatmaps", "--baseline", str(tmp_path / "maps"), "--out", str(tmp_path / "fig"), "--limit", "1"]) == 0
    drawn = np.asarray(Image.open(tmp_path / "fig" / "heatmaps.png").convert("L"))
    assert (drawn > 250).mean() < 0.9


def test_heads_files_with_fractional_or_repeated_heads_are_named(tmp_path):
    half = tmp_path / "half.json"
    half.write_text(json.dumps({"heads": [[2.5, 2], [1, 0]], "knockout_layers": [1]}))
    with pytest.raises(VGRefineConfigError, match=r"2\.5 is not a layer or head index"):
        load_heads(str(half))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"heads": [[1, 0], [2, 3], [1, 0]], "knockout_layers": [1]}))
    with pytest.raises(VGRefineConfigError, match=r"\[\[1, 0\]\] more than once"):
        load_heads(str(twice))
    word = tmp_path / "word.json"
    word.write_text(json.dumps({"heads": [["2", 1]], "knockout_layers": [1]}))
    with pytest.raises(VGRefineConfigError, match="not a layer or head index"):
        load_heads(str(word))


def test_duplicated_options_leave_the_item_out_with_a_reason():
    doc = {"id": "x", "benchmark": "vqa_rad", "question": "Is it?", "options": ["yes", "no", "yes"], "answer": "yes"}
    outcome = vqa_results.closed_outcome(doc, "C")
    assert outcome.correct is None and outcome.excluded.startswith("duplicated options")
    with pytest.raises(scoring.ItemError, match="duplicated options"):
        scoring.mc_prompt("Is it?", ["yes", "no", "yes"])


def test_a_bundle_with_a_byte_that_is_not_utf8_is_named_with_its_offset(tmp_path, monkeypatch):
    rows = [{"question": "Is the lesion benign?", "options": ["yes", "no"], "answer": "yes", "image": ["a.png"], "dataset": "VQA-RAD_test"}]
    data = json.dumps(rows).encode("utf-8").replace(b"benign", b"b\xe9nign")  # a Latin-1 editor's e-acute
    (tmp_path / vqa_data.BUNDLE_FILE).write_bytes(data)
    monkeypatch.setenv(vqa_data.BUNDLE_VAR, str(tmp_path))
    offset = data.index(b"\xe9")
    with pytest.raises(files.DataError, match=rf"{vqa_data.BUNDLE_FILE} is not UTF-8: byte 0xe9 at offset {offset} \(line 1\)"):
        vqa_data.bundle("vqa_rad")


def test_a_huge_question_is_left_out_before_the_batch_and_its_neighbours_run(llava_dir, images):
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {"batch_size": 3})
    huge = "Is there a lesion? " * 110_000  # ~2 MB, far beyond the tiny model's 4,096-token context
    requests = make_requests(
        wrapper, [images[0], images[1], images[0]], ["What is shown?", huge, "Where is it?"], {"max_new_tokens": 2, "lmms_vg": {}}
    )
    t0 = time.time()
    answers = [outputs.decode(o) for o in wrapper.generate_until(requests)]
    assert time.time() - t0 < 60
    assert isinstance(answers[0], outputs.Answer) and isinstance(answers[2], outputs.Answer)
    assert isinstance(answers[1], outputs.SampleError) and answers[1].reason.startswith("prompt too long")
    assert "exceed the model's context of 4096" in answers[1].reason


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [("huatuo_vicrop", "layer=999", "ViCrop layer=999"), ("huatuo_pai", "start_layer=99", "PAI start_layer=99")],
)
def test_method_layers_beyond_the_model_fail_before_any_sample(llava_dir, model, args, message):
    with pytest.raises(MethodConfigError, match=message):
        get_model(model).create_from_arg_string(f"pretrained={llava_dir},device=cpu,{args}", {})


def test_the_one_image_conversion_serves_every_mode():
    """The thumbnail, the model input and the heatmaps share adapters.rgb: a 16-bit image never clips to white."""
    values = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(values)
    converted = np.asarray(rgb(image))
    assert converted.min() == 0 and converted.max() == 255 and len(np.unique(converted[..., 0])) > 200
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.9  # PIL's own conversion clips nearly all of it to white
