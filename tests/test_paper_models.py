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
from markers import frame, landed_cells, marker_image, white_extent
from safetensors.torch import save_file
from test_models import make_requests
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM, Qwen2ForCausalLM

from lmms_vg import geometry, outputs
from lmms_vg.convert import ConversionError, convert
from lmms_vg.demo import tiny
from lmms_vg.families.llava import LlavaS2ForConditionalGeneration
from lmms_vg.grounding import GroundingRecord
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


QUESTIONS = ["What is shown?", "Where is the lesion in this image?"]


def converted_and_encoded(model_id: str, tmp_path, image):
    """``tmp_path/orig`` converted and loaded by ``model_id``; one prompt encoded by its adapter, and where its image tokens are."""
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={convert(tmp_path / 'orig', tmp_path / 'hf')},device=cpu", {})
    inputs = wrapper.adapter.encode([image], ["What is it?"])
    return wrapper, inputs, inputs["input_ids"][0] == wrapper.adapter.image_token_id


def generates_grounds_and_refines(model_id: str, checkpoint, images, tmp_path):
    """Through lmms-eval's registry: a batch of answers, grounding records with one value per layer, VGRefine's knockout."""
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={checkpoint},device=cpu", {"batch_size": 2})
    answers = wrapper.generate_until(make_requests(wrapper, images, QUESTIONS, {"max_new_tokens": 3}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    gen = {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}}
    records = [GroundingRecord.from_output(r) for r in wrapper.generate_until(make_requests(wrapper, images, QUESTIONS, gen))]
    assert all(r.skipped is None and len(r.kl) == 3 for r in records)
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[1, 0], [2, 1], [0, 3]], "knockout_layers": [1]}))
    refined = get_model(f"{model_id}_vgrefine").create_from_arg_string(f"pretrained={checkpoint},device=cpu,heads={heads}", {})
    requests = make_requests(refined, images, QUESTIONS, {"max_new_tokens": 3, "lmms_vg": {}})
    outs = [outputs.decode(o) for o in refined.generate_until(requests)]
    assert all(o.knockout_layers == (1,) and 0.2 <= o.knocked_fraction <= 0.8 for o in outs)
    return wrapper


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_models")
    original_tri(root / "tri")
    original_bio(root / "bio", tower_inside=True)
    return {"llava_tri": convert(root / "tri", root / "tri_hf"), "huatuo_bio": convert(root / "bio", root / "bio_hf")}


@pytest.mark.parametrize("model_id", ["llava_tri", "huatuo_bio"])
def test_registry_generates_grounds_and_refines(model_id, converted, images, tmp_path):
    wrapper = generates_grounds_and_refines(model_id, converted[model_id], images, tmp_path)
    t = wrapper.adapter.transform(images[0])
    assert (t.rows, t.cols) == (4, 4)  # S2: the smallest scale's grid; BiomedCLIP: 64 px / 16


@pytest.mark.parametrize("model_id", ["llava_tri", "huatuo_bio"])
def test_marker_lands_where_the_geometry_says(model_id, converted):
    """Padded to square, resized (S2: to the largest scale), one token per cell of the smallest scale's grid."""
    adapter = get_model(model_id).create_from_arg_string(f"pretrained={converted[model_id]},device=cpu", {}).adapter
    for width, height, box in [(337, 113, (250, 20, 320, 90)), (113, 337, (20, 260, 90, 320)), (200, 200, (30, 120, 90, 180))]:
        image = marker_image(width, height, box)
        pixels = frame(adapter, image)  # un-normalised with the processor's mean and std
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


# ---- VILA-M3: the VILA codebase's layout (llm/, vision_tower/, mm_projector/), SigLIP + mlp_downsample + Llama ------

SIGLIP = {"hidden": 32, "size": 70, "patch": 14}  # 5 x 5 patches: an odd grid, padded to 6 x 6, folded to 3 x 3 tokens


def vila_flat_square(x: torch.Tensor) -> torch.Tensor:
    """VILA's DownSampleBlock, as its code writes it (views and one permute)."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, -1)
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.concat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.concat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.view(n, w, int(h / 2), int(c * 2)).permute(0, 2, 1, 3).contiguous().view(n, int(h / 2), int(w / 2), int(c * 4))
    return x.reshape(x.shape[0], -1, x.shape[-1])


def original_vila(folder):
    """VILA-M3 as the VILA codebase saves it: three subfolders and a top config naming them."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    tok = tiny.build_tokenizer(image_token=False)
    text_cfg = tiny.text_config("llama", len(tok))
    text = LlamaForCausalLM(text_cfg).eval()
    text.save_pretrained(folder / "llm")
    tok.save_pretrained(folder / "llm")
    vcfg = SiglipVisionConfig(
        hidden_size=SIGLIP["hidden"],
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=SIGLIP["size"],
        patch_size=SIGLIP["patch"],
    )
    vision = SiglipVisionModel(vcfg).eval()
    vision.save_pretrained(folder / "vision_tower")
    size = {"height": SIGLIP["size"], "width": SIGLIP["size"]}
    SiglipImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder / "vision_tower")
    width = 4 * SIGLIP["hidden"]
    proj = torch.nn.Sequential(
        torch.nn.Identity(),  # DownSampleBlock: no weights
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, text_cfg.hidden_size),
        torch.nn.GELU(),
        torch.nn.Linear(text_cfg.hidden_size, text_cfg.hidden_size),
    )
    with torch.no_grad():
        proj[1].weight.uniform_(0.5, 1.5)
        proj[1].bias.normal_(0, 0.1)
    (folder / "mm_projector").mkdir(parents=True)
    save_file({f"layers.{k}": v.contiguous() for k, v in proj.state_dict().items()}, str(folder / "mm_projector" / "model.safetensors"))
    (folder / "mm_projector" / "config.json").write_text(json.dumps({"model_type": "v2l_projector", "mm_projector_type": "mlp_downsample"}))
    config = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": "llm",
        "vision_tower_cfg": "vision_tower",
        "mm_projector_cfg": "mm_projector",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "mm_hidden_size": SIGLIP["hidden"],
        "hidden_size": text_cfg.hidden_size,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return text, vision, proj


def test_vila_fold_order_is_vilas_and_cell_order_makes_it_row_major():
    from lmms_vg.families.vila import cell_order, fold

    g = 5
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, g * g, 2).float() + 1  # +1: the zero padding stays apart
    ours, theirs = fold(coords), vila_flat_square(coords)
    assert torch.equal(ours, theirs)
    side = 3
    for cell, token in enumerate(cell_order(side)):  # the row-major cell (r, c) holds patches (2r..2r+1, 2c..2c+1)
        r, c = divmod(cell, side)
        patch_rows = {int(v) - 1 for v in theirs[0, token, 0::2] if v > 0}
        patch_cols = {int(v) - 1 for v in theirs[0, token, 1::2] if v > 0}
        assert patch_rows <= {2 * r, 2 * r + 1} and patch_cols <= {2 * c, 2 * c + 1} and patch_rows and patch_cols


def test_vila_converted_logits_equal_the_original_forward(tmp_path, images):
    text, vision, proj = original_vila(tmp_path / "orig")
    wrapper, inputs, positions = converted_and_encoded("vila_m3", tmp_path, images[0])
    assert int(positions.sum()) == 9  # 70 px / 14 = 5 patches a side, padded to 6, folded to 3 x 3
    with torch.no_grad():
        ours = wrapper.model(**inputs).logits[..., : text.config.vocab_size]
        hidden = vision(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]  # cls_patch: every token
        features = proj[1:](vila_flat_square(hidden))
        expected = spliced_logits(text, inputs, features, wrapper.adapter.image_token_id, text.config.vocab_size)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    prompt = wrapper.tokenizer.decode(inputs["input_ids"][0][~positions])
    assert prompt.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".replace(
            "<image>", ""
        )
    )


@pytest.fixture(scope="module")
def vila_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vila")
    original_vila(root / "orig")
    return convert(root / "orig", root / "hf")


def test_vila_registry_generates_grounds_in_row_major_cells_and_refines(vila_dir, images, tmp_path):
    wrapper = generates_grounds_and_refines("vila_m3", vila_dir, images, tmp_path)
    runner = next(iter(wrapper._grounding.values()))
    batch = runner.passes.batch(images[:1], QUESTIONS[:1])
    tokens, _ = batch.question_and_reference(None)
    cells, _ = runner.question_and_reference_maps(images[:1], QUESTIONS[:1], [None])
    assert torch.allclose(cells, tokens[..., wrapper.adapter.cell_order], atol=1e-6)  # maps reach the metrics in row-major cells


def test_vila_marker_lands_where_the_squash_geometry_says(vila_dir):
    adapter = get_model("vila_m3").create_from_arg_string(f"pretrained={vila_dir},device=cpu", {}).adapter
    for width, height, box in [(337, 113, (250, 20, 320, 90)), (113, 337, (20, 200, 90, 320)), (200, 200, (30, 120, 90, 180))]:
        image = marker_image(width, height, box)
        pixels = frame(adapter, image)  # SigLIP's (x - .5) / .5 undone
        t = adapter.transform(image)
        covered = pixels[:, : 5 * 14, : 5 * 14]  # SigLIP sees 5 patches a side; the 6th row and column of the fold are zeros
        cells = geometry.box_cells([box], "xyxy", t).mask
        landed = landed_cells(np.pad(covered, ((0, 0), (0, 14), (0, 14))), int(t.cell))
        assert landed.any() and not (landed & ~cells).any(), (width, height)
        x0, y0, x1, y1 = box
        mapped = (x0 * t.scale_x, y0 * t.scale_y, x1 * t.scale_x, y1 * t.scale_y)  # squashed: no offsets
        assert np.allclose(white_extent(pixels), mapped, atol=2.0), (white_extent(pixels), mapped)


def test_vila_without_its_vision_tower_or_of_another_family_says_what_to_do(tmp_path, vila_dir, llava_dir):
    import shutil

    original_vila(tmp_path / "orig")
    shutil.rmtree(tmp_path / "orig" / "vision_tower")
    with pytest.raises(ConversionError, match="without vision_tower/"):
        convert(tmp_path / "orig", tmp_path / "hf")
    with pytest.raises(ModelLoadError, match="'llava' checkpoint, not VilaForConditionalGeneration"):
        get_model("vila_m3").create_from_arg_string(f"pretrained={llava_dir},device=cpu", {})
    with pytest.raises(ModelLoadError, match="'llava_vila' checkpoint"):
        get_model("huatuo").create_from_arg_string(f"pretrained={vila_dir},device=cpu", {})


# ---- MedRegA: InternVL-Chat-V1-2's remote-code layout (InternViT + pixel shuffle v1 + mlp1 + Llama/Yi) -------------

INTERN = {"hidden": 32, "heads": 2, "depth": 3, "size": 112, "patch": 14, "mlp": 64}  # 8 x 8 patches -> 4 x 4 tokens


def intern_vit_weights(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, p, n, m = INTERN["hidden"], INTERN["patch"], (INTERN["size"] // INTERN["patch"]) ** 2, INTERN["mlp"]

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    e = "vision_model.embeddings."
    w = {e + "class_embedding": r(1, 1, c), e + "position_embedding": r(1, n + 1, c), e + "patch_embedding.weight": r(c, 3, p, p)}
    w[e + "patch_embedding.bias"] = r(c)
    for i in range(INTERN["depth"]):
        b = f"vision_model.encoder.layers.{i}."
        w |= {b + "norm1.weight": 1 + r(c), b + "norm2.weight": 1 + r(c), b + "ls1": 0.5 + r(c), b + "ls2": 0.5 + r(c)}
        w |= {b + "attn.qkv.weight": r(3 * c, c, scale=0.3), b + "attn.q_norm.weight": 1 + r(c), b + "attn.k_norm.weight": 1 + r(c)}
        w |= {b + "attn.proj.weight": r(c, c, scale=0.3), b + "attn.proj.bias": r(c), b + "mlp.fc1.weight": r(m, c, scale=0.3)}
        w |= {b + "mlp.fc1.bias": r(m), b + "mlp.fc2.weight": r(c, m, scale=0.3), b + "mlp.fc2.bias": r(c)}
    return w


def rms_norm(x, weight, eps=1e-6):
    """InternRMSNorm."""
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def intern_vit(w: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT's last hidden state (rms_norm, qk_normalization, no qkv bias, layer scale), as its modeling code computes it."""
    c, heads = INTERN["hidden"], INTERN["heads"]
    hd = c // heads
    e = "vision_model.embeddings."
    x = F.conv2d(pixels, w[e + "patch_embedding.weight"], w[e + "patch_embedding.bias"], stride=INTERN["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([w[e + "class_embedding"].expand(x.shape[0], -1, -1), x], 1) + w[e + "position_embedding"]
    for i in range(INTERN["depth"]):
        b = f"vision_model.encoder.layers.{i}."
        bsz, n, _ = x.shape
        qkv = (rms_norm(x, w[b + "norm1.weight"]) @ w[b + "attn.qkv.weight"].T).reshape(bsz, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        q = rms_norm(q.transpose(1, 2).flatten(-2, -1), w[b + "attn.q_norm.weight"]).view(bsz, n, heads, hd).transpose(1, 2)
        k = rms_norm(k.transpose(1, 2).flatten(-2, -1), w[b + "attn.k_norm.weight"]).view(bsz, n, heads, hd).transpose(1, 2)
        attn = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), -1)
        out = (attn @ v).transpose(1, 2).reshape(bsz, n, c) @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"]
        x = x + out * w[b + "ls1"]
        h = rms_norm(x, w[b + "norm2.weight"])
        x = (
            x
            + (F.gelu(h @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"]) @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"])
            * w[b + "ls2"]
        )
    return x


def pixel_shuffle_v1(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle with ps_version 'v1' (no swap back)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))


def original_medrega(folder):
    """MedRegA as InternVLChatModel saves it (remote code): vision_model.*, mlp1.*, language_model.*; InternVL's special tokens."""
    torch.manual_seed(0)
    tok = tiny.build_tokenizer(image_token=False, extra_special=("<img>", "</img>", "<IMG_CONTEXT>"))
    text_cfg = tiny.text_config("llama", len(tok))
    text = LlamaForCausalLM(text_cfg).eval()
    vit = intern_vit_weights()
    width = 4 * INTERN["hidden"]
    mlp1 = torch.nn.Sequential(
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, text_cfg.hidden_size),
        torch.nn.GELU(),
        torch.nn.Linear(text_cfg.hidden_size, text_cfg.hidden_size),
    )
    weights = (
        vit | {f"mlp1.{k}": v for k, v in mlp1.state_dict().items()} | {f"language_model.{k}": v for k, v in text.state_dict().items()}
    )
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": INTERN["hidden"],
        "num_attention_heads": INTERN["heads"],
        "num_hidden_layers": INTERN["depth"],
        "intermediate_size": INTERN["mlp"],
        "image_size": INTERN["size"],
        "patch_size": INTERN["patch"],
        "norm_type": "rms_norm",
        "qk_normalization": True,
        "qkv_bias": False,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision_config,
        "llm_config": {**text_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]},
        "force_image_size": INTERN["size"],
        "downsample_ratio": 0.5,
        "ps_version": "v1",
        "select_layer": -1,
        "template": "Hermes-2",
        "dynamic_image_size": False,
    }
    save_original(folder, weights, config, tok)
    return text, vit, mlp1


def test_medrega_converted_logits_equal_the_original_forward(tmp_path, images):
    text, vit, mlp1 = original_medrega(tmp_path / "orig")
    wrapper, inputs, positions = converted_and_encoded("medrega", tmp_path, images[0])
    assert int(positions.sum()) == 16  # 112 px / 14 = 8 patches a side, shuffled 2 x 2
    with torch.no_grad():
        ours = wrapper.model(**inputs).logits[..., : text.config.vocab_size]
        grid = intern_vit(vit, inputs["pixel_values"])[:, 1:].reshape(1, 8, 8, -1)
        features = mlp1(pixel_shuffle_v1(grid).reshape(1, 16, -1))
        expected = spliced_logits(text, inputs, features, wrapper.adapter.image_token_id, text.config.vocab_size)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    prompt = wrapper.tokenizer.decode(inputs["input_ids"][0])
    assert "<|im_start|>user\n<img><IMG_CONTEXT>" in prompt and "</img>\nWhat is it?<|im_end|><|im_start|>assistant\n" in prompt


def test_medrega_registry_generates_grounds_in_row_major_cells_and_refines(tmp_path, images):
    original_medrega(tmp_path / "orig")
    wrapper = generates_grounds_and_refines("medrega", convert(tmp_path / "orig", tmp_path / "hf"), images, tmp_path)
    assert wrapper.adapter.cell_order == [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15]  # v1's transposed 4 x 4 grid
    t = wrapper.adapter.transform(images[0])
    assert (t.rows, t.cols, t.cell) == (4, 4, 28.0)


def test_medrega_with_another_llm_or_tiling_says_what_to_do(tmp_path):
    original_medrega(tmp_path / "orig")
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    (tmp_path / "orig" / "config.json").write_text(json.dumps({**config, "dynamic_image_size": True}))
    with pytest.raises(ConversionError, match="dynamic_image_size"):
        convert(tmp_path / "orig", tmp_path / "hf")
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    (tmp_path / "orig" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="InternLM2ForCausalLM LLM"):
        convert(tmp_path / "orig", tmp_path / "hf")


def test_medrega_marker_lands_where_the_squash_geometry_says(tmp_path):
    original_medrega(tmp_path / "orig")
    adapter = (
        get_model("medrega").create_from_arg_string(f"pretrained={convert(tmp_path / 'orig', tmp_path / 'hf')},device=cpu", {}).adapter
    )
    for width, height, box in [(337, 113, (250, 20, 320, 90)), (113, 337, (20, 200, 90, 320)), (200, 200, (30, 120, 90, 180))]:
        image = marker_image(width, height, box)
        pixels = frame(adapter, image)  # ImageNet statistics undone
        t = adapter.transform(image)
        assert pixels.shape[1:] == (t.rows * t.cell, t.cols * t.cell)
        landed = landed_cells(pixels, int(t.cell))
        assert landed.any() and not (landed & ~geometry.box_cells([box], "xyxy", t).mask).any(), (width, height)
        x0, y0, x1, y1 = box
        assert np.allclose(white_extent(pixels), (x0 * t.scale_x, y0 * t.scale_y, x1 * t.scale_x, y1 * t.scale_y), atol=2.0)
