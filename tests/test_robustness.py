"""One bad sample costs one sample, and a failure never looks like a finished run.

Bad rows and files in the published layouts, run through the real lmms-eval CLI with batches of 4:
the good rows are scored and counted, each bad one is skipped with a reason that names it.
"""

import json
import struct
import zlib
from pathlib import Path

import medvqa_fixtures as fx
import pytest
from cli import FEW_TOKENS, run_lmms_eval
from fixtures import _image

from lmms_vg import cli, files, outputs, vgmed_data


def truncated_jpeg(path: Path, seed: int) -> None:
    """A JPEG cut in half, as a download interrupted midway leaves it."""
    full = path.with_suffix(".full.jpg")
    _image(full, 120, 90, seed)
    blob = full.read_bytes()
    full.unlink()
    path.write_bytes(blob[: len(blob) // 2])


def bomb_png(path: Path) -> None:
    """A PNG header that claims 30000 x 30000 pixels: PIL refuses it as a decompression bomb when opening."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def write_bad_vgmed(root: Path) -> Path:
    """The authors' current VGMED layout (VGMED_{kind}.jsonl, xyxy boxes) with one bad row of each kind among good ones."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("ct_a.png", "ct_b.png", "mr_c.png")):
        _image(root / name, 120, 100, i)
    truncated_jpeg(root / "cut.jpg", 5)
    bomb_png(root / "bomb.png")
    good = {"image": "ct_a.png", "question": "Where is the liver?", "bbox": [[10, 20, 60, 70]]}
    rows = [
        good,
        {**good, "image": "ct_b.png", "bbox": [[10, float("nan"), 60, 70]]},  # NaN coordinate
        {**good, "image": "mr_c.png", "question": "Where is <image> the lesion?"},  # a literal <image>: stripped, as the original does
        {**good, "bbox": []},  # empty box list
        {k: v for k, v in good.items() if k != "bbox"},  # no bbox key
        {**good, "bbox": [10, 20, 60, 70]},  # a flat box
        {**good, "bbox": [[10, 20, 60]]},  # three numbers
        {k: v for k, v in good.items() if k != "question"},  # no question
        {**good, "image": "cut.jpg"},  # truncated file
        {**good, "image": "bomb.png"},  # decompression bomb
        {**good, "image": "ct_b.png"},
    ]
    (root / "VGMED_localization.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


EXPECTED_GROUNDING_SKIPS = {
    "non-finite box": 1,
    "no box": 2,
    "flat box": 1,
    "malformed box": 1,
    "no question": 1,
    "image truncated or corrupt": 1,
    "image too large": 1,
}


def write_bad_bundle(root: Path) -> Path:
    """HuatuoGPT-Vision's bundle layout, VQA-RAD rows: good ones, a question holding <image>, a truncated and a bomb image."""
    bundle = fx.bundle(root)
    truncated_jpeg(root / "images" / "cut.jpg", 7)
    bomb_png(root / "images" / "bomb.png")
    rows = json.loads((bundle / "medical_multimodel_evaluation_data.json").read_text())
    good = next(r for r in rows if r["dataset"] == "VQA-RAD_test")
    rows += [
        {**good, "question": "Is <image> there a mass?"},
        {**good, "image": ["images/cut.jpg"]},
        {**good, "image": ["images/bomb.png"]},
        {**good, "answer": "no"},
        {**good, "question": "Is the lung clear?"},
    ]
    (bundle / "medical_multimodel_evaluation_data.json").write_text(json.dumps(rows))
    return bundle


@pytest.mark.parametrize("model", ["huatuo", "huatuo_vgrefine"])
def test_bad_rows_cost_themselves_only_through_the_cli(tmp_path, llava_dir, model):
    env = {
        "LMMS_VG_VGMED_ROOT": str(write_bad_vgmed(tmp_path / "vgmed")),
        "LMMS_VG_MEDVQA_SOURCE": "bundle",
        "LMMS_VG_MEDVQA_BUNDLE": str(write_bad_bundle(tmp_path / "bundle")),
    }
    heads = ",heads=" + str(tiny_heads(tmp_path)) if model.endswith("vgrefine") else ""
    results, folder = run_lmms_eval(
        tmp_path, model, f"pretrained={llava_dir},device=cpu{heads}", "vgmed_loc,vqa_rad", env, ["--batch_size", "4", *FEW_TOKENS]
    )
    loc = results["results"]["vgmed_loc"]["samples,none"]
    assert (loc["scored"], loc["skipped"]) == (3, 8), loc
    assert loc["skip_reasons"] == EXPECTED_GROUNDING_SKIPS
    logged = [json.loads(line) for line in next(folder.glob("*samples_vgmed_loc.jsonl")).read_text().splitlines()]
    reasons = {s["doc_id"]: s["samples"]["skipped"] for s in logged}
    assert "VGMED_localization.jsonl:2" in reasons[1] and "nan" in reasons[1]  # the file and line, and what is wrong
    assert "cut.jpg" in reasons[8] and "bomb.png" in reasons[9]
    vqa = results["results"]["vqa_rad"]["samples,none"]
    assert (vqa["total"], vqa["scored"], vqa["excluded"]) == (6, 4, 2), vqa
    assert vqa["excluded_reasons"] == {"image truncated or corrupt": 1, "image too large": 1}


def tiny_heads(tmp_path: Path) -> Path:
    """A calibration file for the tiny model (3 layers x 4 heads)."""
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": [[1, 0], [1, 2], [0, 1]], "knockout_layers": [2]}))
    return path


def test_settings_are_parsed_strictly_before_any_sample(llava_dir, tmp_path):
    """What lmms-eval hands over from --model_args: words it does not know as booleans stay strings; none may read as true."""
    from lmms_eval.models import get_model

    from lmms_vg.methods.vgrefine import VGRefineConfigError
    from lmms_vg.settings import SettingError
    from lmms_vg_models.loading import ModelLoadError

    def make(model, args, cli_batch=1):
        return get_model(model).create_from_arg_string(f"pretrained={llava_dir},device=cpu,{args}", {"batch_size": cli_batch})

    # the preset's heads do not fit the tiny model: were 'off' read as true, this would raise
    assert make("huatuo_vgrefine", "vgrefine=off").method is None
    assert make("huatuo", "batch_size=4").batch_size == 4  # --model_args wins over the CLI's --batch_size
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "my_remote_vlm", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code=true"):  # 'no' means no: the checkpoint's code is not run
        get_model("lmms_vg_llava").create_from_arg_string(f"pretrained={remote},device=cpu,trust_remote_code=no", {})
    for args, match in (
        ("trust_remote_code=maybe", "trust_remote_code='maybe' is not a boolean"),
        ("vgrefine=sometimes", "vgrefine='sometimes' is not a boolean"),
        ("batch_size=four", "batch_size='four' is not a whole number"),
        ("batch_size=0", "batch_size=0 must be at least 1"),
        ("vgrefine=true,heads=huatuo_7b,knockout_layers=-1", "knockout_layers=-1 must be at least 0"),
    ):
        with pytest.raises(SettingError, match=match):
            make("huatuo", args)
    a_file = tmp_path / "maps.npz"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        make("huatuo", f"save_maps={a_file}")
    corrupt, keyless = tmp_path / "corrupt.json", tmp_path / "keyless.json"
    corrupt.write_text('{"heads": [[1, 0],')
    keyless.write_text('{"knockout_layers": [2]}')
    with pytest.raises(VGRefineConfigError, match=r"corrupt.json' is not valid JSON"):
        make("lmms_vg_llava_vgrefine", f"heads={corrupt}")
    with pytest.raises(VGRefineConfigError, match=r"keyless.json' has no 'heads' list"):
        make("lmms_vg_llava_vgrefine", f"heads={keyless}")


def test_a_bad_setting_through_the_cli_names_itself_and_writes_nothing(tmp_path, llava_dir):
    import os
    import subprocess
    import sys

    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "huatuo",
        "--model_args",
        f"pretrained={llava_dir},device=cpu,trust_remote_code=maybe",
    ]
    cmd += ["--tasks", "vgmed_demo", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert "trust_remote_code='maybe' is not a boolean: use true or false" in proc.stdout + proc.stderr
    assert not list(out.rglob("*_results.json"))
    # lmms-eval exits 0 all the same; `lmms-vg check` is the exit code a script can trust
    assert cli.main(["check", str(tmp_path), "--tasks", "vgmed_demo"]) == 2


def test_check_and_calibrate_refuse_what_would_look_like_success(tmp_path, capsys):
    results = tmp_path / "r"
    results.mkdir()
    data = {
        "config": {"model": "huatuo"},
        "results": {"vqa_rad": {"accuracy,none": float("nan"), "samples,none": {"scored": 0, "excluded": 4}}},
    }
    (results / "20260101_000000_results.json").write_text(json.dumps(data))
    assert cli.main(["check", str(results), "--tasks", "vqa_rad"]) == 2  # every sample failed
    assert cli.main(["check", str(results), "--tasks", "vqa_rad,vgmed_loc"]) == 2  # one task missing
    assert "vgmed_loc: no results" in capsys.readouterr().err
    assert cli.main(["calibrate", str(results), "--task", "vqa_rad", "--top-k", "0", "--knockout-layers", "1"]) == 2
    assert "--top-k 0" in capsys.readouterr().err


def test_truncated_image_is_reported_despite_lmms_evals_global_setting(tmp_path):
    from PIL import ImageFile

    truncated_jpeg(tmp_path / "cut.jpg", 3)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what importing lmms-eval does to the whole process
    try:
        with pytest.raises(files.ImageError, match="image truncated or corrupt: .*cut.jpg"):
            files.open_image(str(tmp_path / "cut.jpg"))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as lmms-eval set it
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _requests(wrapper, texts):
    from lmms_eval.api.instance import Instance

    wrapper.task_dict = {"t": {"test": [{"images": [fx.img(i)]} for i in range(len(texts))]}}
    return [
        Instance(
            "generate_until",
            (q, {"max_new_tokens": 2, "lmms_vg": {}}, lambda d: d["images"], i, "t", "test"),
            i,
            {"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, q in enumerate(texts)
    ]


@pytest.mark.parametrize("model", ["huatuo", "lmms_vg_llava_vgrefine"])
def test_a_sample_that_breaks_the_model_costs_itself_only(llava_dir, tmp_path, monkeypatch, model):
    """Whatever fails inside a batch of 4 (here: one prompt the model cannot take), the batch reruns one by one."""
    from lmms_eval.models import get_model

    heads = f",heads={tiny_heads(tmp_path)}" if model.endswith("vgrefine") else ""
    wrapper = get_model(model).create_from_arg_string(f"pretrained={llava_dir},device=cpu{heads}", {"batch_size": 4})
    original = wrapper.adapter.tokenizer.__class__.__call__

    def tokenize(self, text, *args, **kwargs):  # a prompt this model cannot take, wherever it is tokenised
        texts = [text] if isinstance(text, str) else text
        if any("POISON" in t for t in texts):
            raise RuntimeError("cannot tokenise this prompt")
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(wrapper.adapter.tokenizer.__class__, "__call__", tokenize)
    outs = wrapper.generate_until(_requests(wrapper, ["Is it normal?", "POISON here", "Where?", "Which side?"]))
    decoded = [outputs.decode(o) for o in outs]
    assert decoded[1].reason.startswith("sample failed: RuntimeError: cannot tokenise this prompt (t doc 1)")
    assert all(isinstance(d, outputs.Answer) for i, d in enumerate(decoded) if i != 1)


def test_samples_failing_in_a_row_stop_the_run(llava_dir, monkeypatch):
    from lmms_eval.models import get_model

    from lmms_vg_models import wrapper as wrapper_module

    monkeypatch.setattr(wrapper_module, "FAILURE_STREAK_LIMIT", 3)
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {"batch_size": 2})
    monkeypatch.setattr(wrapper.adapter, "encode", lambda *a, **k: (_ for _ in ()).throw(TypeError("a setup bug")))
    with pytest.raises(RuntimeError, match="3 samples in a row failed.*a setup bug"):
        wrapper.generate_until(_requests(wrapper, ["a", "b", "c", "d"]))


def test_outputs_round_trip_and_lmms_evals_own_tasks_get_plain_text(llava_dir, tmp_path):
    """One codec for what a wrapper hands a task; a task that is not lmms-vg's (no `lmms_vg` key) gets the answer's text."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from lmms_vg.grounding import GroundingRecord

    for value in (
        outputs.Answer("B", 0.5, (16,)),
        outputs.SampleError("image too large: 'x' (t doc 3)"),
        GroundingRecord(kl=[0.1], ar=[2.0]),
    ):
        assert outputs.decode(outputs.encode(value)) == value
    assert outputs.decode('{"text": "not ours"}') == outputs.Answer('{"text": "not ours"}')  # a model may answer in JSON
    assert GroundingRecord.from_output(outputs.encode(outputs.SampleError("no box (x)"))).skipped == "no box (x)"

    wrapper = get_model("lmms_vg_llava_vgrefine").create_from_arg_string(
        f"pretrained={llava_dir},device=cpu,heads={tiny_heads(tmp_path)}", {}
    )
    wrapper.task_dict = {"t": {"test": [{"images": [fx.img(0)]}]}}
    builtin = Instance(
        "generate_until", ("Q?", {"max_new_tokens": 2}, lambda d: d["images"], 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1}
    )
    ours = Instance(
        "generate_until",
        ("Q?", {"max_new_tokens": 2, "lmms_vg": {}}, lambda d: d["images"], 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    plain, typed = wrapper.generate_until([builtin]), wrapper.generate_until([ours])
    assert plain[0] == outputs.decode(typed[0]).text and not plain[0].startswith("{")


def test_an_empty_annotation_file_is_named(tmp_path, monkeypatch):
    root = tmp_path / "vgmed"
    root.mkdir()
    (root / "VGMED_localization.jsonl").write_text("\n")
    monkeypatch.setenv("LMMS_VG_VGMED_ROOT", str(root))
    with pytest.raises(files.DataError, match=r"VGMED_localization.jsonl has no rows"):
        vgmed_data.vgmed_docs("localization")
    (root / "VGMED_localization.jsonl").write_text('{"image": "a.png", "question": "Where?", "bbox": [[1, 2, 3, 4]]}\n{"image": \n')
    with pytest.raises(files.DataError, match=r"VGMED_localization.jsonl:2 is not valid JSON"):
        vgmed_data.vgmed_docs("localization")


def test_images_inside_an_archive_get_the_same_checks(tmp_path):
    """SLAKE and PMC-VQA keep their images in zip archives: a truncated or bomb member is named like a file."""
    import zipfile

    from lmms_vg import vqa_data

    truncated_jpeg(tmp_path / "cut.jpg", 4)
    bomb_png(tmp_path / "bomb.png")
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "cut.jpg", "imgs/xmlab1/source.jpg")
        zf.write(tmp_path / "bomb.png", "imgs/xmlab2/source.jpg")
    doc = {"id": "slake_1", "image_zip": str(archive), "image_member": "imgs/xmlab1/source.jpg"}
    with pytest.raises(files.ImageError, match=r"image truncated or corrupt: .*imgs.zip:imgs/xmlab1/source.jpg"):
        vqa_data.load_images(doc)
    with pytest.raises(files.ImageError, match=r"image too large: .*imgs.zip:imgs/xmlab2/source.jpg"):
        vqa_data.load_images({**doc, "image_member": "imgs/xmlab2/source.jpg"})
