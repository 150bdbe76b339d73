"""LLaVA-Tri (S2 multi-scale CLIP) and HuatuoGPT-V-Bio (BiomedCLIP ViT), from their original layouts.

Each tiny checkpoint is written as the original code saves it: LLaVA-Tri in the MedTrinity/LLaVA
layout (``llava_llama``, ``s2: true``, a CLIP tower under ``model.vision_tower.vision_tower``);
HuatuoGPT-V-Bio in LLaVA-NeXT's (``llava_qwen``, an open_clip timm ViT under
``model.vision_tower.vision_tower.trunk``, or BiomedCLIP's own ``open_clip_config.json`` +
``open_clip_pytorch_model.bin``). ``lmms-vg convert`` turns them into transformers folders; the
logits are compared with forwards written here from the original definitions (timm's ViT block,
the S2 wrapper's tiles and area pooling), not with the converted model's code.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from lmms_eval.models import get_model
from markers import landed_cells, marker_image, white_extent
from safetensors.torch import save_file
from test_models import make_requests
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM, Qwen2ForCausalLM

from lmms_vg import geometry, outputs
from lmms_vg.convert import ConversionError, convert
from lmms_vg.demo import tiny
from lmms_vg.grounding import GroundingRecord
from lmms_vg.s2 import LlavaS2ForConditionalGeneration
from lmms_vg_models.loading import ModelLoadError

BIOMEDCLIP = "open_clip_hub:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
VIT = {"hidden": 128, "depth": 3, "patch": 16, "grid": 4, "mlp": 256}  # 64 px, 4x4 patches, two 64-dim heads
S2_SCALES = (56, 112)  # CLIP at 56 px, patch 14: a 4x4 grid per tile; 112 = 2x2 tiles


def projector(width: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))


def save_original(folder, weights: dict, config: dict, tok) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)


# ---- HuatuoGPT-V-Bio: LLaVA-NeXT + BiomedCLIP (open_clip, timm ViT-B/16 in shape) --------------------------------


def timm_vit_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer's state dict (open_clip's ``visual.trunk``), random."""
    g = torch.Generator().manual_seed(seed)
    d, p, n, m = VIT["hidden"], VIT["patch"], VIT["grid"] ** 2, VIT["mlp"]

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    w = {"cls_token": r(1, 1, d), "pos_embed": r(1, n + 1, d), "patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d)}
    for i in range(VIT["depth"]):
        b = f"blocks.{i}."
        w |= {b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d)}
        w |= {b + "attn.qkv.weight": r(3 * d, d, scale=0.2), b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d, scale=0.2)}
        w |= {b + "attn.proj.bias": r(d), b + "mlp.fc1.weight": r(m, d, scale=0.2), b + "mlp.fc1.bias": r(m)}
        w |= {b + "mlp.fc2.weight": r(d, m, scale=0.2), b + "mlp.fc2.bias": r(d)}
    return w | {"norm.weight": 1 + r(d), "norm.bias": r(d)}


def timm_vit_blocks(w: dict, pixels: torch.Tensor) -> list[torch.Tensor]:
    """timm's ViT forward, block by block (pre-norm, fused qkv, 64-dim heads, exact GELU, LayerNorm eps 1e-6)."""
    d = VIT["hidden"]
    x = F.conv2d(pixels, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=VIT["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], 1) + w["pos_embed"]
    outs = []
    for i in range(VIT["depth"]):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (d,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        qkv = (h @ w[b + "attn.qkv.weight"].T + w[b + "attn.qkv.bias"]).reshape(x.shape[0], x.shape[1], 3, d // 64, 64)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * 64**-0.5, -1)
        x = x + ((attn @ v).transpose(1, 2).reshape(x.shape) @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        x = x + (F.gelu(h @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"]) @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"])
        outs.append(x)
    return outs


def original_bio(folder, tower_inside: bool):
    """HuatuoGPT-V-Bio as LLaVA-NeXT saves it; BiomedCLIP beside it as open_clip publishes it when the tower is not inside."""
    torch.manual_seed(0)
    tok = tiny.build_tokenizer(image_token=False)
    text_cfg = tiny.text_config("qwen2", len(tok))
    text = Qwen2ForCausalLM(text_cfg).eval()
    proj = projector(VIT["hidden"], text_cfg.hidden_size)
    trunk = timm_vit_weights()
    head = {"head.proj.weight": torch.randn(32, VIT["hidden"])}  # open_clip's projection to its 512-d space (here 32)
    weights = dict(text.state_dict()) | {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    if tower_inside:
        weights |= {f"model.vision_tower.vision_tower.{k}": v for k, v in ({f"trunk.{k}": v for k, v in trunk.items()} | head).items()}
    config = {
        **text_cfg.to_dict(),
        "model_type": "llava_qwen",
        "architectures": ["LlavaQwenForCausalLM"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_vision_tower": BIOMEDCLIP,
        "vision_tower_pretrained": None,
        "mm_hidden_size": VIT["hidden"],
    }
    save_original(folder, weights, config, tok)
    clip = folder.parent / "biomedclip"
    if not tower_inside:
        clip.mkdir(exist_ok=True)
        state = {f"visual.trunk.{k}": v for k, v in trunk.items()} | {f"visual.{k}": v for k, v in head.items()}
        state |= {"text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6)}
        torch.save(state, clip / "open_clip_pytorch_model.bin")
        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        open_clip_config = {
            "model_cfg": {
                "embed_dim": 512,
                "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "", "timm_proj": "linear"},
            },
            "preprocess_cfg": {"mean": mean, "std": std},
        }
        (clip / "open_clip_config.json").write_text(json.dumps(open_clip_config))
    return text, trunk, proj, clip


def spliced_logits(text, inputs, features, image_token_id, vocab):
    """The LLaVA codebase's forward: the projected image features in place of the image tokens, then the text model."""
    positions = inputs["input_ids"][0] == image_token_id
    ids = inputs["input_ids"].clone()
    ids[0, positions] = 0
    embeds = text.model.embed_tokens(ids)
    embeds[0, positions] = features[0]
    return text(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits[..., :vocab]


@pytest.mark.parametrize("tower_inside", [True, False])
def test_bio_converted_logits_equal_the_original_forward(tmp_path, tower_inside):
    text, trunk, proj, clip = original_bio(tmp_path / "orig", tower_inside)
    out = convert(tmp_path / "orig", tmp_path / "hf", vision_tower=None if tower_inside else clip)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert type(model.model.vision_tower).__name__ == "ViTModel"
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=[random_image(64, 64)], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == VIT["grid"] ** 2  # CLS dropped
    with torch.no_grad():
        ours = model(**inputs).logits[..., : text.config.vocab_size]
        features = proj(timm_vit_blocks(trunk, inputs["pixel_values"])[-2][:, 1:])  # select layer -2, patches
        expected = spliced_logits(text, inputs, features, model.config.image_token_id, text.config.vocab_size)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()


def test_bio_without_its_tower_says_what_to_do(tmp_path):
    original_bio(tmp_path / "orig", tower_inside=False)
    with pytest.raises(ConversionError, match="--vision-tower .*BiomedCLIP"):
        convert(tmp_path / "orig", tmp_path / "hf")


# ---- LLaVA-Tri: MedTrinity's LLaVA (Llama-3-8B) with CLIPVisionTowerS2 ---------------------------------------------


def original_tri(folder):
    """LLaVA-Tri as the MedTrinity codebase saves it: llava_llama, s2 on, the CLIP tower's weights inside, its config in vit/."""
    torch.manual_seed(0)
    tok = tiny.build_tokenizer(image_token=False)
    text_cfg = tiny.text_config("llama", len(tok))
    text = LlamaForCausalLM(text_cfg).eval()
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)
    ).eval()
    proj = projector(32 * len(S2_SCALES), text_cfg.hidden_size)
    weights = dict(text.state_dict()) | {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    weights |= {
        f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v for k, v in vision.state_dict().items()
    }
    config = {
        **text_cfg.to_dict(),
        "model_type": "llava_llama",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 32 * len(S2_SCALES),
        "s2": True,
        "s2_scales": ",".join(map(str, S2_SCALES)),
    }
    save_original(folder, weights, config, tok)
    vision.save_pretrained(folder / "vit")
    return text, vision, proj


def s2_reference(vision, pixels: torch.Tensor) -> torch.Tensor:
    """The S2 wrapper's features, tile by tile: each scale's 4x4 tile grids placed on a canvas, average-pooled to 4x4."""
    small = min(S2_SCALES)
    per_scale = []
    for size in S2_SCALES:
        x = F.interpolate(pixels.float(), size=(size, size), mode="bicubic")
        n = size // small
        canvas = torch.zeros(pixels.shape[0], 32, 4 * n, 4 * n)
        for i in range(n):
            for j in range(n):
                tile = x[:, :, i * small : (i + 1) * small, j * small : (j + 1) * small]
                feats = vision(tile, output_hidden_states=True).hidden_states[-2][:, 1:]  # [B, 16, 32]
                canvas[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = feats.transpose(1, 2).reshape(-1, 32, 4, 4)
        per_scale.append(F.avg_pool2d(canvas, n))  # area resize by a whole factor = average pooling
    return torch.cat(per_scale, 1).flatten(2).transpose(1, 2)  # [B, 16, 64]


def test_tri_converted_logits_equal_the_s2_forward(tmp_path):
    text, vision, proj = original_tri(tmp_path / "orig")
    out = convert(tmp_path / "orig", tmp_path / "hf")
    model = LlavaS2ForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.s2_scales == list(S2_SCALES)
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=[random_image(90, 70)], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == max(S2_SCALES)  # the processor resizes to the largest scale
    assert int((inputs["input_ids"][0] == model.config.image_token_id).sum()) == 16  # the smallest scale's 4x4 grid
    with torch.no_grad():
        ours = model(**inputs).logits[..., : text.config.vocab_size]
        expected = spliced_logits(text, inputs, proj(s2_reference(vision, inputs["pixel_values"])), model.config.image_token_id, 10**9)
    assert torch.allclose(ours, expected[..., : text.config.vocab_size], atol=1e-5, rtol=0), (
        (ours - expected[..., : ours.shape[-1]]).abs().max()
    )


# ---- both, through lmms-eval's registry -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_models")
    original_tri(root / "tri")
    original_bio(root / "bio", tower_inside=True)
    return {"llava_tri": convert(root / "tri", root / "tri_hf"), "huatuo_bio": convert(root / "bio", root / "bio_hf")}


@pytest.mark.parametrize("model_id", ["llava_tri", "huatuo_bio"])
def test_registry_generates_grounds_and_refines(model_id, converted, images, tmp_path):
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={converted[model_id]},device=cpu", {"batch_size": 2})
    questions = ["What is shown?", "Where is the lesion in this image?"]
    answers = wrapper.generate_until(make_requests(wrapper, images, questions, {"max_new_tokens": 3}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    gen = {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}}
    records = [GroundingRecord.from_output(r) for r in wrapper.generate_until(make_requests(wrapper, images, questions, gen))]
    assert all(r.skipped is None and len(r.kl) == 3 for r in records)
    t = wrapper.adapter.transform(images[0])
    assert (t.rows, t.cols) == (4, 4)  # S2: the smallest scale's grid; BiomedCLIP: 64 px / 16
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[1, 0], [2, 1], [0, 3]], "knockout_layers": [1]}))
    refined = get_model(f"{model_id}_vgrefine").create_from_arg_string(f"pretrained={converted[model_id]},device=cpu,heads={heads}", {})
    outs = [
        outputs.decode(o) for o in refined.generate_until(make_requests(refined, images, questions, {"max_new_tokens": 3, "lmms_vg": {}}))
    ]
    assert all(o.knockout_layers == (1,) and 0.3 <= o.knocked_fraction <= 0.7 for o in outs)


@pytest.mark.parametrize("model_id", ["llava_tri", "huatuo_bio"])
def test_marker_lands_where_the_geometry_says(model_id, converted):
    """Padded to square, resized (S2: to the largest scale), one token per cell of the smallest scale's grid."""
    adapter = get_model(model_id).create_from_arg_string(f"pretrained={converted[model_id]},device=cpu", {}).adapter
    for width, height, box in [(337, 113, (250, 20, 320, 90)), (113, 337, (20, 260, 90, 320)), (200, 200, (30, 120, 90, 180))]:
        image = marker_image(width, height, box)
        pixels = adapter.pixel_inputs([image])["pixel_values"][0].float().numpy()
        t = adapter.transform(image)
        assert pixels.shape[1:] == (t.rows * t.cell, t.cols * t.cell)
        cells = geometry.box_cells([box], "xyxy", t).mask
        landed = landed_cells(pixels, int(t.cell))
        assert landed.any() and not (landed & ~cells).any(), (model_id, width, height)
        x0, y0, x1, y1 = box
        mapped = (x0 * t.scale_x + t.offset_x, y0 * t.scale_y + t.offset_y, x1 * t.scale_x + t.offset_x, y1 * t.scale_y + t.offset_y)
        assert np.allclose(white_extent(pixels), mapped, atol=2.0), (model_id, white_extent(pixels), mapped)


def test_a_checkpoint_of_another_family_is_refused(converted, qwen2_vl_dir):
    with pytest.raises(ModelLoadError, match="'llava_s2' checkpoint, not"):
        get_model("lingshu").create_from_arg_string(f"pretrained={converted['llava_tri']},device=cpu", {})
    with pytest.raises(ModelLoadError, match="'qwen2_vl' checkpoint"):
        get_model("llava_tri").create_from_arg_string(f"pretrained={qwen2_vl_dir},device=cpu", {})


@pytest.mark.parametrize("model_id", ["llava_tri", "huatuo_bio"])
def test_no_published_checkpoint_says_how_to_get_one(model_id):
    with pytest.raises(ModelLoadError, match="lmms-vg convert.*pretrained="):
        get_model(model_id).create_from_arg_string("device=cpu", {})
