"""README 'Adding a model', run: a new checkpoint is a preset record; a new family is an adapter plus a family record."""

import pytest
from lmms_eval.models import MODEL_REGISTRY_V2, get_model
from test_models import make_requests

from lmms_vg.adapters import LlavaAdapter
from lmms_vg.demo import tiny
from lmms_vg.presets import Family, ModelPreset, register_family
from lmms_vg.prompts import HUATUO_TEMPLATE
from lmms_vg_models.model_ids import register_preset


def test_a_new_preset_is_a_record(tmp_path, images):
    checkpoint = tiny.build_llava(tmp_path / "my-med-llava", family="mistral")
    for manifest in register_preset(ModelPreset("my_med_llava", str(checkpoint), HUATUO_TEMPLATE, pad_to_square=True, heads="huatuo_7b")):
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)  # what the entry point does for presets.py
    wrapper = get_model("my_med_llava").create_from_arg_string("device=cpu")
    out = wrapper.generate_until(make_requests(wrapper, images[:1], ["What is shown?"], {"max_new_tokens": 3}))
    assert isinstance(out[0], str)
    assert wrapper.adapter.prompt("Q") == "<|user|>\n<image>\nQ\n<|assistant|>\n"
    with pytest.raises(ValueError, match="do not exist"):  # the VGRefine twin exists and checks its heads
        get_model("my_med_llava_vgrefine").create_from_arg_string("device=cpu")


class PlainAdapter(LlavaAdapter):
    """A model whose prompt is 'USER: <image>\\n{text} ASSISTANT:' whatever its tokenizer says."""

    def prompt(self, text: str, n_images: int = 1) -> str:
        return "USER: " + "<image>\n" * n_images + f"{text} ASSISTANT:"


def test_a_new_family_is_an_adapter_plus_a_record(tmp_path, images):
    checkpoint = tiny.build_llava(tmp_path / "plain", family="llama")
    register_family(Family("plain", f"{__name__}.PlainAdapter", {"llava": "LlavaForConditionalGeneration"}))
    for manifest in register_preset(ModelPreset("plain_llava", str(checkpoint), None, pad_to_square=False, family="plain")):
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
    wrapper = get_model("plain_llava").create_from_arg_string("device=cpu")
    records = wrapper.generate_until(
        make_requests(wrapper, images, ["Where?", "What?"], {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}})
    )
    assert all('"skipped": null' in r for r in records)
    prefix = wrapper.adapter.split_prompts(images[:1], ["Where?"]).prefix[0]
    assert wrapper.tokenizer.decode([t for t in prefix if t != wrapper.adapter.image_token_id]) == "USER: "
