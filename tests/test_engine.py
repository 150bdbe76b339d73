"""The attention engine against eager attention and a hand-written masked reference."""

import pytest
import torch
from reference_attention import REFERENCE
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from lmms_vg import engine

QUESTIONS = ["What is the shape?", "Where is the red circle in this picture, left or right?"]


def load_llava(path, dtype=torch.float32):
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    engine.install(model)
    return model, AutoProcessor.from_pretrained(path)


def llava_batch(processor, images, questions):
    texts = [
        processor.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def load_qwen2_vl(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()  # Qwen2-VL, Qwen2.5-VL or Qwen3-VL
    engine.install(model)
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def qwen_batch(model, tok, image_processor, images, questions):
    pixels = image_processor(images=images, return_tensors="pt")
    counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True).replace(
            "<|image_pad|>", "<|image_pad|>" * n
        )
        for q, n in zip(questions, counts)
    ]
    batch = dict(tok(texts, return_tensors="pt", padding=True))
    batch["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).long()
    return {**batch, **pixels}


def eager_attentions(model, inputs):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})


def masked_eager_attentions(model, inputs, knockout: dict):
    """Eager attention weights of every layer with ``knockout`` (layers, rows, cols, mode) applied by the reference's own masks."""
    REFERENCE["knockout"] = knockout
    model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        REFERENCE["knockout"] = None
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})


def capture_last_row(model, inputs, image_token_id):
    cols = engine.image_token_positions(inputs["input_ids"], image_token_id)
    last = inputs["input_ids"].shape[1] - 1  # left padding: every prompt ends at the last column
    cap = engine.Capture(rows=torch.full((cols.shape[0], 1), last), cols=cols)
    with torch.no_grad(), engine.arm(model, capture=cap):
        logits = model(**inputs).logits
    return cap, cols, logits


@pytest.mark.parametrize("batch", [1, 2])
def test_llava_capture_equals_eager_attention(llava_dir, images, batch):
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    if batch == 2:
        assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    cap, cols, _ = capture_last_row(model, inputs, model.config.image_token_id)
    ours = cap.last_row_maps()  # [B, L, H, N]
    eager = eager_attentions(model, inputs)
    assert ours.shape == (batch, len(eager), eager[0].shape[1], cols.shape[1])
    for layer, weights in enumerate(eager):
        expected = torch.stack([weights[b, :, -1, cols[b]] for b in range(batch)])
        assert torch.allclose(ours[:, layer], expected, atol=1e-5, rtol=0), (layer, (ours[:, layer] - expected).abs().max())


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("checkpoint", ["qwen2_vl_dir", "qwen2_5_vl_dir", "qwen3_vl_dir"])
def test_qwen2_vl_capture_equals_eager_attention(checkpoint, request, images, batch):
    """Qwen2-VL, Qwen2.5-VL (Lingshu) and Qwen3-VL: maps and logits through the engine equal transformers' eager forward."""
    model, tok, image_processor = load_qwen2_vl(request.getfixturevalue(checkpoint))
    imgs = [images[0]] * batch  # one image size per batch: same number of image tokens
    inputs = qwen_batch(model, tok, image_processor, imgs, QUESTIONS[:batch])
    cap, cols, logits = capture_last_row(model, inputs, model.config.image_token_id)
    eager = eager_attentions(model, inputs)
    for layer, weights in enumerate(eager):
        expected = torch.stack([weights[b, :, -1, cols[b]] for b in range(batch)])
        assert torch.allclose(cap.last_row_maps()[:, layer], expected, atol=1e-5, rtol=0)
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        reference = model(**inputs).logits
    real = inputs["attention_mask"].bool()  # a left pad's row attends to nothing: its logits are not defined
    assert torch.allclose(logits[real], reference[real], atol=1e-5, rtol=0)


def test_capture_leaves_outputs_bit_identical(llava_dir, images):
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        plain = model(**inputs).logits
    model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    _, _, captured = capture_last_row(model, inputs, model.config.image_token_id)
    assert torch.equal(plain, captured)


def knockout_plan(inputs, image_token_id, layers, mode, seed=0):
    """Rows: every token after the image to the end of the prompt; cols: a random half of the image tokens."""
    ids = inputs["input_ids"]
    cols_pos = engine.image_token_positions(ids, image_token_id)
    gen = torch.Generator().manual_seed(seed)
    cols = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        chosen = cols_pos[b][torch.rand(cols_pos.shape[1], generator=gen) < 0.5]
        cols[b, chosen] = True
    rows = engine.span_mask(ids.shape[1], cols_pos[:, -1] + 1, [ids.shape[1]] * ids.shape[0])
    return engine.Knockout(layers=frozenset(layers), rows=rows, cols=cols, mode=mode)


def reference_logits(model, inputs, ko):
    REFERENCE["knockout"] = {"layers": ko.layers, "rows": ko.rows, "cols": ko.cols, "mode": ko.mode}
    model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        REFERENCE["knockout"] = None
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})


@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("batch", [1, 2])
def test_knockout_equals_hand_masked_eager(llava_dir, images, mode, batch):
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[1], mode=mode)
    with torch.no_grad(), engine.arm(model, knockout=ko):
        ours = model(**inputs).logits
    expected = reference_logits(model, inputs, ko)
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(ours[mask], expected[mask], atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = model(**inputs).logits
    assert not torch.allclose(ours[mask], plain[mask], atol=1e-4), "the knockout must change something"


def test_knockout_rows_outside_plan_bit_identical(llava_dir, images):
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[0, 2], mode="mask")
    model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        plain = model(**inputs).logits
    model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    with torch.no_grad(), engine.arm(model, knockout=ko):
        ours = model(**inputs).logits
    first_row = int(ko.rows.float().argmax(1).min())
    assert torch.equal(ours[:, :first_row], plain[:, :first_row])
    assert not torch.equal(ours[:, first_row:], plain[:, first_row:])


def test_decode_steps_untouched(llava_dir, images):
    """After a knocked-out prefill, a decode step under the armed plan equals plain SDPA bit for bit."""
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[1], mode="mask")
    with torch.no_grad(), engine.arm(model, knockout=ko):
        out = model(**inputs, use_cache=True)
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    step = {"input_ids": next_ids, "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], 1)}
    import copy

    cache_a, cache_b = out.past_key_values, copy.deepcopy(out.past_key_values)
    with torch.no_grad(), engine.arm(model, knockout=ko):
        armed = model(**step, past_key_values=cache_a).logits
    model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        plain = model(**step, past_key_values=cache_b).logits
    model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    assert torch.equal(armed, plain)


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_generate_with_knockout_matches_reference(llava_dir, images, mode):
    """Knockout inside generate(): the prompt rows are knocked out at prefill, decode runs plain."""
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[2], mode=mode)
    with torch.no_grad(), engine.arm(model, knockout=ko):
        ours = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    REFERENCE["knockout"] = {"layers": ko.layers, "rows": ko.rows, "cols": ko.cols, "mode": mode}
    model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        REFERENCE["knockout"] = None
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_capture_in_half_precision_is_fp32_and_close(llava_dir, images, dtype):
    model, processor = load_llava(llava_dir, dtype=dtype)
    inputs = llava_batch(processor, images, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    cap, cols, _ = capture_last_row(model, inputs, model.config.image_token_id)
    maps = cap.last_row_maps()
    assert maps.dtype == torch.float32
    eager = eager_attentions(model, inputs)
    for layer, weights in enumerate(eager):
        expected = torch.stack([weights[b, :, -1, cols[b]] for b in range(2)]).float()
        assert torch.allclose(maps[:, layer], expected, atol=2e-2, rtol=0)


def test_no_state_left_after_arm(llava_dir, images):
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images[:1], QUESTIONS[:1])
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[0], mode="mask")
    with torch.no_grad():
        before = model(**inputs).logits
        with engine.arm(model, knockout=ko):
            model(**inputs)
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert engine._ACTIVE.get() is None


def test_bad_inputs_give_clear_errors(llava_dir):
    model, processor = load_llava(llava_dir)
    ids = processor.tokenizer(["no image here"], return_tensors="pt")["input_ids"]
    with pytest.raises(engine.EngineError, match="no image tokens"):
        engine.image_token_positions(ids, model.config.image_token_id, "tiny-llava")
    bad = engine.Capture(rows=torch.zeros(1, 1, dtype=torch.long), cols=torch.zeros(1, 1, dtype=torch.long), layers=frozenset({7}))
    with pytest.raises(engine.EngineError, match="out of range"), engine.arm(model, capture=bad):
        pass
    with pytest.raises(engine.EngineError, match="not a supported architecture"):
        engine.install(torch.nn.Linear(2, 2))

    class FlashOnly(torch.nn.Module):
        _supports_sdpa = False
        _supports_attention_backend = False

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.language_model.layers[0].self_attn = torch.nn.Module()

    with pytest.raises(engine.EngineError, match="cannot be swapped"):
        engine.install(FlashOnly())
    unprepared = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    with pytest.raises(engine.EngineError, match="install"), engine.arm(unprepared):
        pass


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_capture_under_knockout_equals_hand_masked_weights(llava_dir, images, mode):
    """Captured weights at a knockout layer are the ones used: renormalised (mask) or multiplied (zero)."""
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images, QUESTIONS)
    ko = knockout_plan(inputs, model.config.image_token_id, layers=[1], mode=mode)
    cols = engine.image_token_positions(inputs["input_ids"], model.config.image_token_id)
    last = inputs["input_ids"].shape[1] - 1
    cap = engine.Capture(rows=torch.full((2, 1), last), cols=cols)
    with torch.no_grad(), engine.arm(model, capture=cap, knockout=ko):
        model(**inputs)
    weights = masked_eager_attentions(model, inputs, {"layers": ko.layers, "rows": ko.rows, "cols": ko.cols, "mode": mode})
    ours = cap.last_row_maps()
    for layer, w in enumerate(weights):
        expected = torch.stack([w[b, :, -1, cols[b]] for b in range(2)])
        assert torch.allclose(ours[:, layer], expected, atol=1e-5, rtol=0), layer
    blocked = torch.stack([ko.cols[b, cols[b]] for b in range(2)])  # [B, N]
    assert (ours[:, 1].permute(1, 0, 2)[:, blocked] == 0).all()  # blocked image columns carry no weight at the knockout layer


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    ("kind", "values", "steps"), [("amplify", (0.5, 0.2), "all"), ("scale", (0.5, 2.0), "prefill"), ("amplify", (0.5, 0.2), "decode")]
)
def test_steer_inside_generate_matches_the_published_formula(llava_dir, images, batch, kind, values, steps):
    """PAI (a + alpha|a| on the last row: every step, or the decoding steps only) and AdaptVis (a * w in the prefill)
    against an eager attention that edits its logits as their code does."""
    model, processor = load_llava(llava_dir)
    inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    image = inputs["input_ids"] == model.config.image_token_id
    steer = engine.Steer(frozenset({1, 2}), image, kind, torch.tensor(values[:batch]), steps)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad(), engine.arm(model, steer=steer):
        ours = model.generate(**inputs, **kwargs)
    REFERENCE["steer"] = {"layers": steer.layers, "cols": image, "kind": kind, "value": steer.value, "steps": steps}
    model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs)
    finally:
        REFERENCE["steer"] = None
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    with torch.no_grad():
        plain = model.generate(**inputs, **kwargs)
    assert torch.equal(ours.sequences, expected.sequences)
    for step_ours, step_ref in zip(ours.logits, expected.logits):
        assert torch.allclose(step_ours, step_ref, atol=1e-4, rtol=0)
    # the steer acts where it says: the first token's logits are the prompt pass's, the rest the decoding steps'
    first_changed = not torch.allclose(ours.logits[0], plain.logits[0], atol=1e-4)
    later_changed = any(not torch.allclose(o, p, atol=1e-4) for o, p in zip(ours.logits[1:], plain.logits[1:]))
    assert first_changed == (steps != "decode"), "the prompt pass is steered exactly when the steer says so"
    assert later_changed or steps == "prefill", "the steer changed nothing: the test would not see a wrong formula"
