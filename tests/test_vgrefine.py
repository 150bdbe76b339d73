"""VGRefine against a plain three-pass reference written here: eager attention, masks by hand."""

import json

import numpy as np
import pytest
import torch
from cli import FEW_TOKENS, run_lmms_eval
from reference_attention import REFERENCE
from test_engine import QUESTIONS, eager_attentions, llava_batch, load_llava

from lmms_vg import engine
from lmms_vg.demo import tiny
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.methods.vgrefine import HeadRanking, VGRefineConfig, VGRefineConfigError, VGRefiner, calibrate, load_heads
from lmms_vg.prompts import GENERIC_PROMPT

HEADS = ((1, 0), (2, 3), (0, 1), (1, 2), (2, 0))
REF_PROMPT = "Write a general description of the image."


def last_row_maps(model, processor, images, texts):
    inputs = llava_batch(processor, images, texts)
    cols = [(ids == model.config.image_token_id).nonzero().flatten() for ids in inputs["input_ids"]]
    att = eager_attentions(model, inputs)
    maps = torch.stack([torch.stack([a[b, :, -1, cols[b]] for a in att]) for b in range(len(images))])  # [B, L, H, N]
    return inputs, cols, maps


def reference_vgrefine(model, processor, images, questions, top_k, percentile, layers, mode, max_new_tokens):
    """The method as the paper states it, in three separate full-prompt passes."""
    inputs, cols, q = last_row_maps(model, processor, images, questions)
    _, _, r = last_row_maps(model, processor, images, [REF_PROMPT] * len(images))
    selected = HEADS[:top_k]
    T = inputs["input_ids"].shape[1]
    rows = torch.zeros(len(images), T, dtype=torch.bool)
    blocked = torch.zeros(len(images), T, dtype=torch.bool)
    for b in range(len(images)):
        triage = np.mean([q[b, l, h].numpy() / (r[b, l].mean(0).numpy() + 1e-10) for l, h in selected], axis=0)
        irrelevant = triage < np.percentile(triage, percentile)
        blocked[b, cols[b][torch.from_numpy(irrelevant)]] = True
        rows[b, int(cols[b][-1]) + 1 :] = True  # every prompt token after the image
    REFERENCE["knockout"] = {"layers": set(layers), "rows": rows, "cols": blocked, "mode": mode}
    model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        REFERENCE["knockout"] = None
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    return out.sequences[:, T:], out.logits[0], blocked


@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("top_k", [3, 1])  # top_k=1: only layer 1 is needed, the map passes stop there
def test_vgrefine_equals_three_pass_reference(llava_dir, images, mode, batch, top_k):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = VGRefineConfig(heads=HEADS, knockout_layers=(2,), top_k=top_k, percentile=50, mode=mode, reference_prompt=REF_PROMPT)
    refiner = VGRefiner(adapter, config)
    ours = refiner.generate(images[:batch], QUESTIONS[:batch], max_new_tokens=6, do_sample=False, output_logits=True)
    tokens, logits, blocked = reference_vgrefine(model, processor, images[:batch], QUESTIONS[:batch], top_k, 50, (2,), mode, 6)
    assert torch.equal(ours.tokens, tokens)
    assert torch.allclose(ours.first_logits, logits, atol=1e-4, rtol=0)
    n_image = ours.keep.shape[1]
    assert ours.knocked_fraction == pytest.approx((blocked.sum(1).float() / n_image).tolist())
    # and the knockout matters: plain generation's first logits differ
    batch_inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    with torch.no_grad():
        plain = model(**batch_inputs).logits[:, -1]
    assert not torch.allclose(plain, logits, atol=1e-4)


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_full_knockout_cuts_the_image_values_out(llava_dir, images, mode):
    """Every patch knocked out at layer 1: the question rows' attention output there ignores the image's values."""
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    cols = engine.image_token_positions(inputs["input_ids"], model.config.image_token_id)
    T = inputs["input_ids"].shape[1]
    image_cols = torch.zeros(2, T, dtype=torch.bool).scatter_(1, cols, True)
    rows = engine.span_mask(T, cols[:, -1] + 1, [T, T])
    attn = model.model.language_model.layers[1].self_attn
    outputs = []

    def keep_output(module, args, output):
        outputs.append(output[0].detach().clone())

    def perturb_values(module, args, output):
        noise = torch.randn_like(output) * 5
        return torch.where(image_cols[:, :, None], output + noise, output)

    for ko in (engine.Knockout(frozenset({1}), rows, image_cols, mode), None):
        outputs.clear()
        handle = attn.register_forward_hook(keep_output)
        try:
            with torch.no_grad(), engine.arm(model, knockout=ko):
                model(**inputs)
                perturb = attn.v_proj.register_forward_hook(perturb_values)
                try:
                    model(**inputs)
                finally:
                    perturb.remove()
        finally:
            handle.remove()
        same = torch.allclose(outputs[0][rows], outputs[1][rows], atol=1e-6)
        assert same == (ko is not None), "with the knockout, the image values must not matter; without it they must"


def test_bad_settings_fail_before_any_sample(llava_dir):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    preset = load_heads("huatuo_7b")
    with pytest.raises(VGRefineConfigError, match="do not exist"):
        VGRefiner(adapter, VGRefineConfig(heads=preset.heads, knockout_layers=(1,)))
    with pytest.raises(VGRefineConfigError, match="out of range"):
        VGRefiner(adapter, VGRefineConfig(heads=HEADS, knockout_layers=(5,), top_k=2))
    with pytest.raises(VGRefineConfigError, match="outside"):
        VGRefineConfig(heads=HEADS, knockout_layers=(1,), top_k=2, percentile=101)
    with pytest.raises(VGRefineConfigError, match="top_k=9"):
        VGRefineConfig(heads=HEADS, knockout_layers=(1,), top_k=9)
    with pytest.raises(VGRefineConfigError, match="no head ranking"):
        load_heads("nope")


def test_shipped_preset_is_the_authors():
    preset = load_heads("huatuo_7b")
    assert len(preset.heads) == 20 and preset.heads[0] == (15, 4) and preset.heads[-1] == (17, 26) and preset.knockout_layers == (16,)


def test_calibration_ranks_by_mean_kl(tmp_path):
    kl = np.array([[3.0, 1.0, 5.0], [0.5, 4.0, 2.0]])
    preset = calibrate(kl, top_k=3, knockout_layers=(1,), model="m", source="vgmed_coco_loc", samples=7)
    assert preset.heads == ((1, 0), (0, 1), (1, 2)) and preset.scores == (0.5, 1.0, 2.0)
    path = tmp_path / "heads.json"
    path.write_text(preset.to_json())
    assert load_heads(str(path)) == HeadRanking(preset.heads, (1,), "m", "vgmed_coco_loc", 7, (0.5, 1.0, 2.0))


@pytest.fixture(scope="session")
def huatuo_shaped_dir(tmp_path_factory):
    """HuatuoGPT-Vision-7B's layout scaled down: 28 layers x 28 heads, 4 KV heads, 24x24 image grid."""
    return tiny.build_llava(tmp_path_factory.mktemp("huatuo_shape"), layers=28, heads=28, kv_heads=4, hidden=224, image_size=336)


def test_huatuo_vgrefine_through_cli(tmp_path, huatuo_shaped_dir):
    import medvqa_fixtures as fx

    env = fx.all_sources(tmp_path / "data")
    results, folder = run_lmms_eval(
        tmp_path, "huatuo_vgrefine", f"pretrained={huatuo_shaped_dir},device=cpu", "vqa_rad,pmc_vqa", env, FEW_TOKENS
    )
    assert results["results"]["vqa_rad"]["samples,none"]["scored"] == 3
    logged = [json.loads(line)["accuracy"] for line in next(folder.glob("*samples_pmc_vqa.jsonl")).read_text().splitlines()]
    scored = [o for o in logged if o["correct"] is not None]
    assert len(scored) == 2
    for o in scored:  # per-sample log: fraction knocked out (p=50 of 576 patches) and the layers used
        assert o["knockout_layers"] == [16] and 0.45 <= o["knocked_fraction"] <= 0.55


def test_triage_keeps_at_or_above_percentile_by_hand():
    from lmms_vg.methods.vgrefine import triage_keep, triage_map

    assert triage_keep(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), 50).tolist() == [[False, True, True, True]]  # median 2: ties kept
    assert triage_keep(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 25).tolist() == [[True, False, True, True]]  # threshold 1.75
    assert triage_keep(torch.tensor([[4.0, 1.0]]), 0).all() and triage_keep(torch.tensor([[4.0, 1.0]]), 100).tolist() == [[True, False]]
    q = torch.zeros(1, 2, 2, 3)
    q[0, 1, 0] = torch.tensor([2.0, 4.0, 6.0])
    q[0, 0, 1] = torch.tensor([1.0, 1.0, 4.0])
    ref = torch.ones(1, 2, 2, 3)
    ref[0, 1] = torch.tensor([[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]])  # layer 1 head-mean [2, 2, 2]
    expected = (torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([1.0, 1.0, 4.0])) / 2
    assert torch.allclose(triage_map(q, ref, ((1, 0), (0, 1))), expected[None].double().float(), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("checkpoint", ["llava_dir", "qwen2_vl_dir", "qwen2_5_vl_dir", "qwen3_vl_dir"])
def test_shared_prefix_equals_full_prompts(checkpoint, batch, request, images):
    """The image prefix runs once and every text is a suffix on it, with its whole-prompt positions, so maps, VGRefine's
    triage and answers equal those of full prompts (themselves equal to transformers' eager forward, test_engine).

    LLaVA (1-D positions): the question and the generic prompt ride on the prefix's own pass, side by side, the
    second blocked from the first; M-RoPE (Qwen2-VL family): the prefix runs alone and the suffixes add its shift."""
    from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
    from lmms_vg.passes import FullPromptBatch, ReferenceCache, SharedPrefixBatch
    from lmms_vg.presets import family_of
    from lmms_vg_models.loading import load_checkpoint

    family = "llava" if checkpoint == "llava_dir" else "qwen2_vl"
    model, processor = load_checkpoint(
        str(request.getfixturevalue(checkpoint)), family_of(family).model_types, torch.float32, None, "main", False
    )
    engine.install(model)
    adapter = (LlavaAdapter if family == "llava" else Qwen2VLAdapter)(model, processor)
    imgs, texts = [images[0]] * batch, QUESTIONS[:batch]  # one grid per batch; questions of different lengths: left padding
    shared, full = (kind(adapter, imgs, texts, [None] * batch, ReferenceCache(0)) for kind in (SharedPrefixBatch, FullPromptBatch))
    runs = []
    hook = engine.text_decoder_layers(model)[0].register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        q_s, r_s = shared.question_and_reference(GENERIC_PROMPT)
    finally:
        hook.remove()
    assert len(runs) == (1 if family == "llava" else 2)  # one pass for prefix and both texts, or the prefix then the texts
    q_f, r_f = full.question_and_reference(GENERIC_PROMPT)
    assert torch.allclose(q_s, q_f, atol=1e-5, rtol=0) and torch.allclose(r_s, r_f, atol=1e-5, rtol=0)
    config = VGRefineConfig(heads=((1, 0), (2, 1), (0, 3)), knockout_layers=(1,), top_k=3)
    keep = config.keep(*shared.question_and_reference(GENERIC_PROMPT, config.map_layers))
    assert torch.equal(keep, config.keep(*full.question_and_reference(GENERIC_PROMPT, config.map_layers)))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "pad_token_id": adapter.tokenizer.pad_token_id}
    tokens_s, logits_s = shared.generate(shared.knockout(keep, config.knockout_layers, config.mode), **kwargs)
    tokens_f, logits_f = full.generate(full.knockout(keep, config.knockout_layers, config.mode), **kwargs)
    assert torch.equal(tokens_s, tokens_f) and torch.allclose(logits_s, logits_f, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("checkpoint", ["llava_dir", "qwen2_vl_dir"])
def test_knocked_pass_resumes_below_the_knockout_layer(checkpoint, batch, request, images):
    """Layers below the first knockout layer are not run again for the knocked-out pass: same tokens and logits as running them."""
    from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
    from lmms_vg.presets import family_of
    from lmms_vg_models.loading import load_checkpoint

    family = "qwen2_vl" if checkpoint.startswith("qwen") else "llava"
    model, processor = load_checkpoint(
        str(request.getfixturevalue(checkpoint)), family_of(family).model_types, torch.float32, None, "main", False
    )
    engine.install(model)
    adapter = (Qwen2VLAdapter if family == "qwen2_vl" else LlavaAdapter)(model, processor)
    config = VGRefineConfig(heads=((1, 0), (2, 1), (1, 3)), knockout_layers=(2,), top_k=3)
    calls = []
    hook = engine.text_decoder_layers(model)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "pad_token_id": adapter.tokenizer.pad_token_id}
    imgs = [images[0]] * batch
    try:
        shared = VGRefiner(adapter, config, reference_cache_size=0).generate(imgs, QUESTIONS[:batch], **kwargs)
        first_runs, calls[:] = len(calls), []
        full = VGRefiner(adapter, config, reference_cache_size=0, share_layers=False).generate(imgs, QUESTIONS[:batch], **kwargs)
    finally:
        hook.remove()
    assert first_runs == len(calls) - 1  # layer 0 ran once less: the knocked-out prefill resumed at layer 2
    assert torch.equal(shared.tokens, full.tokens) and torch.equal(shared.keep, full.keep)
    assert torch.allclose(shared.first_logits, full.first_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_two_knockout_layers_and_another_percentile_equal_the_reference(llava_dir, images, mode):
    """Knockout at layers 1 and 2 (the resumed pass starts below the first), the 30th percentile on 64 patches: tokens, first
    logits and the logged knocked fraction as the three-pass reference gives them."""
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = VGRefineConfig(heads=HEADS, knockout_layers=(1, 2), top_k=3, percentile=30, mode=mode, reference_prompt=REF_PROMPT)
    ours = VGRefiner(adapter, config).generate(images, QUESTIONS[:2], max_new_tokens=6, do_sample=False, output_logits=True)
    tokens, logits, blocked = reference_vgrefine(model, processor, images, QUESTIONS[:2], 3, 30, (1, 2), mode, 6)
    assert torch.equal(ours.tokens, tokens) and torch.allclose(ours.first_logits, logits, atol=1e-4, rtol=0)
    assert ours.knocked_fraction == pytest.approx((blocked.sum(1).float() / 64).tolist())
    assert all(abs(f - 0.30) < 0.02 for f in ours.knocked_fraction)  # about 30% of 64 patches below the 30th percentile
    assert ours.layers == (1, 2)


def test_the_users_knockout_layers_win_over_the_heads_files(tmp_path):
    from lmms_vg.methods.vgrefine import config_from_args

    ranking = tmp_path / "heads.json"
    ranking.write_text(json.dumps({"heads": [[0, 1], [1, 2], [2, 0]], "knockout_layers": [2], "percentile": 40}))
    given = config_from_args("m", str(ranking), None, None, "1", "mask")
    assert (given.knockout_layers, given.top_k, given.percentile, given.mode) == ((1,), 3, 40.0, "mask")
    assert config_from_args("m", str(ranking), "2", "60", None, "zero", default_layers=(0,)).knockout_layers == (2,)  # the file's
    assert config_from_args("m", str(ranking), None, None, None, "mask").selected == ((0, 1), (1, 2), (2, 0))
    no_layers = tmp_path / "bare.json"
    no_layers.write_text(json.dumps({"heads": [[0, 1]]}))
    assert config_from_args("m", str(no_layers), None, None, None, "mask", default_layers=(2,)).knockout_layers == (2,)  # the preset's
    assert config_from_args("m", str(no_layers), None, None, None, "mask", (2,), normalise=False).reference_prompt is None
    with pytest.raises(ValueError, match="m: VGRefine needs heads="):
        config_from_args("m", None, None, None, None, "mask")


def test_the_reference_cache_keys_on_the_prompt_and_the_steer(llava_dir, images):
    """An image seen again with another generic prompt, or under another steer, gets that prompt's or steer's maps, not the
    cached ones: each equal to a pass without the cache."""
    from lmms_vg.methods.base import Steering
    from lmms_vg.passes import Passes

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    cached, fresh = Passes(adapter, 8), Passes(adapter, 0)
    keys = ["img0", "img1"]

    def reference(passes, prompt, steer=None):
        return passes.batch(images, QUESTIONS[:2], keys).question_and_reference(prompt, steer=steer)[1]

    first = reference(cached, REF_PROMPT)
    other = reference(cached, "Describe the image.")
    assert torch.allclose(other, reference(fresh, "Describe the image."), atol=1e-6) and not torch.allclose(other, first, atol=1e-4)
    steer = Steering("amplify", frozenset({1, 2}), torch.tensor([0.5, 0.5]), "all")
    steered = reference(cached, REF_PROMPT, steer)
    assert torch.allclose(steered, reference(fresh, REF_PROMPT, steer), atol=1e-6) and not torch.allclose(steered, first, atol=1e-4)
    assert torch.equal(reference(cached, REF_PROMPT), first)  # and the first is still served from the cache
