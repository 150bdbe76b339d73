"""Conversion of an original LLaVA-format checkpoint, checked against a forward written from the original weights."""

import json

import pytest
import torch
from conftest import random_image
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration, Qwen2ForCausalLM

from lmms_vg.convert import ConversionError, convert
from lmms_vg.demo import tiny


def original_checkpoint(folder, tower_inside: bool, pickle: bool):
    """What the LLaVA codebase saves for a llava_qwen2 model (HuatuoGPT-Vision's layout)."""
    torch.manual_seed(0)
    tok = tiny.build_tokenizer(image_token=False)
    text_cfg = tiny.text_config("qwen2", len(tok))
    text = Qwen2ForCausalLM(text_cfg).eval()
    vision_cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14
    )
    vision = CLIPVisionModel(vision_cfg).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    weights = dict(text.state_dict())  # model.embed_tokens / model.layers.* / model.norm / lm_head
    weights.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    (folder / "vit").mkdir(parents=True)
    vision.save_pretrained(folder / "vit")
    if tower_inside:
        weights.update(
            {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v for k, v in vision.state_dict().items()}
        )
    weights = {k: v.contiguous() for k, v in weights.items()}
    if pickle:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    config = {
        **text_cfg.to_dict(),
        "model_type": "llava_qwen2",
        "architectures": ["LlavaQwen2ForCausalLM"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 32,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)
    return text, vision, projector


@pytest.mark.parametrize("tower_inside, pickle", [(False, False), (True, True)])
def test_converted_logits_equal_original_forward(tmp_path, tower_inside, pickle):
    text, vision, projector = original_checkpoint(tmp_path / "orig", tower_inside, pickle)
    out = convert(tmp_path / "orig", tmp_path / "hf", vision_tower=None if tower_inside else tmp_path / "orig" / "vit")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is the shape?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\n<image>\nWhat is the shape?\n<|assistant|>\n"
    inputs = processor(images=[random_image(70, 50)], text=[prompt], return_tensors="pt")
    image_positions = inputs["input_ids"][0] == model.config.image_token_id
    assert image_positions.sum() == 16  # 56 px / 14 = 4x4 patches, CLS dropped
    with torch.no_grad():
        ours = model(**inputs).logits[..., : text.config.vocab_size]
        feats = vision(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]  # layer -2, patches
        ids = inputs["input_ids"].clone()
        ids[0, image_positions] = 0
        embeds = text.model.embed_tokens(ids)
        embeds[0, image_positions] = projector(feats)[0]
        expected = text(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


def test_conversion_errors(tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        convert(tmp_path, tmp_path / "out")
    original_checkpoint(tmp_path / "orig", tower_inside=False, pickle=False)
    import shutil

    shutil.rmtree(tmp_path / "orig" / "vit")
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert(tmp_path / "orig", tmp_path / "out")
