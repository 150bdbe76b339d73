"""README 'Adding a model', run: a new family in one file passes the conformance battery and runs in lmms-eval; a new
checkpoint is a preset in a data file outside the package, listed without torch, its template from a Jinja file."""

import subprocess
import sys

import new_family_deepseek_vl as deepseek
import pytest
from cli import FEW_TOKENS, run_lmms_eval
from lmms_eval.models import MODEL_REGISTRY_V2, get_model
from test_models import make_requests

from lmms_vg import conformance, outputs
from lmms_vg.adapters import BaseAdapter
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.presets import ModelPreset, family_of
from lmms_vg_models.model_ids import register_preset


def test_a_new_family_in_one_file_passes_the_battery_and_runs(tmp_path, images):
    family = family_of("deepseek_vl")  # registered by importing its module, as a family module registers itself
    assert issubclass(family.adapter, BaseAdapter) and not issubclass(family.adapter, LlavaAdapter)
    checkpoint = family.tiny(tmp_path / "deepseek")
    results = conformance.run_checks(conformance.load_adapter("deepseek_vl", str(checkpoint)))
    assert [r.name for r in results if r.passed is not True] == [], conformance.report(results)
    for manifest in register_preset(ModelPreset(model_id="my_deepseek", checkpoint=str(checkpoint), family="deepseek_vl")):
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    wrapper = get_model("my_deepseek").create_from_arg_string("device=cpu", {"batch_size": 2})
    answers = wrapper.generate_until(make_requests(wrapper, images, ["What is shown?", "Where?"], {"max_new_tokens": 3}))
    assert all(isinstance(outputs.decode(a), outputs.Answer) for a in answers)
    gen = {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}}
    records = [
        outputs.GroundingRecord.from_output(r) for r in wrapper.generate_until(make_requests(wrapper, images, ["Where?", "What?"], gen))
    ]
    assert all(r.skipped is None and len(r.kl) == 3 for r in records)
    assert wrapper.adapter.transform(images[0]).rows == 4 and deepseek.TEMPLATE in wrapper.tokenizer.chat_template


def test_a_preset_from_a_data_file_is_listed_without_torch_and_runs(tmp_path, llava_dir):
    """A TOML preset outside the package (LMMS_VG_PRESETS), its template a Jinja file beside it: lmms-eval lists its ids
    (and their method twins) without importing torch, runs it, and its results name the checkpoint."""
    (tmp_path / "my_template.jinja").write_text(
        "{% for message in messages %}<|user|>\n{{ message['content'] }}\n<|assistant|>\n{% endfor %}"
    )
    presets_file = tmp_path / "my_presets.toml"
    presets_file.write_text(
        f'[[preset]]\nmodel_id = "my_med_llava"\ncheckpoint = "{llava_dir}"\nchat_template = "@my_template.jinja"\n'
        'pad_to_square = true\ntokenisation = "huatuo"\nnote = "my fine-tune"\n'
    )
    env = {"LMMS_VG_PRESETS": str(presets_file)}
    code = (
        "import sys; import lmms_eval.models as m; names = m.MODEL_REGISTRY_V2.list_model_names();"
        "print('my_med_llava' in names, 'my_med_llava_vgrefine' in names, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**_env(), **env}).stdout.split()
    assert out == ["True", "True", "False"]
    results, _ = run_lmms_eval(tmp_path, "my_med_llava", "device=cpu", "vgmed_demo", env=env, extra=[*FEW_TOKENS, "--limit", "2"])
    run = results["results"]["vgmed_demo"]["samples,none"]["run"]
    assert run["model"] == "my_med_llava" and run["checkpoint"] == str(llava_dir)


def test_a_bad_preset_file_is_named(tmp_path, monkeypatch):
    from lmms_vg import presets

    bad = tmp_path / "bad.toml"
    bad.write_text('[[preset]]\nmodel_id = "x"\ncheckpont = "typo"\n')
    monkeypatch.setenv("LMMS_VG_PRESETS", str(bad))
    with pytest.raises(ValueError, match=r"bad.toml, x: unknown fields \['checkpont'\]"):
        presets.load_families()


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}
