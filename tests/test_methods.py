"""PAI and AdaptVis against references written here from their published code (an eager attention that
edits the logits as theirs does, a step-by-step greedy loop with PAI's guidance formula): same tokens,
logits within 1e-4 in fp32, for one prompt and a left-padded batch."""

import math

import pytest
import torch
from reference_attention import REFERENCE
from test_engine import QUESTIONS, llava_batch, load_llava

from lmms_vg import engine, methods
from lmms_vg.adapters import LlavaAdapter

STEPS = 4


def eager(model):
    model.set_attn_implementation({"text_config": "reference_eager"})


def ours(model):
    model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})


def last_logits(model, ids, mask, pixel_values=None):
    """A full forward (no cache), positions from the left padding; the last position's logits."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values).logits[:, -1].float()


def pai_reference(model, processor, inputs, questions, alpha, gamma, start_layer):
    """PAI as its code runs: attention edit on the last row of every step; CFGLogits against the text-only prompt."""
    layers = frozenset(range(start_layer, model.config.text_config.num_hidden_layers))
    image = inputs["input_ids"] == model.config.image_token_id
    texts = [
        processor.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], tokenize=False, add_generation_prompt=True).replace(
            "<image>", ""
        )
        for q in questions
    ]
    text = processor.tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask, t_ids, t_mask = inputs["input_ids"], inputs["attention_mask"], text["input_ids"], text["attention_mask"]
    eager(model)
    first, new = None, []
    try:
        for _ in range(STEPS):
            REFERENCE["steer"] = {
                "layers": layers,
                "cols": image,
                "kind": "amplify",
                "value": torch.full((ids.shape[0],), alpha),
                "prefill_only": False,
            }
            mm = last_logits(model, ids, mask, inputs["pixel_values"])
            REFERENCE["steer"] = None  # use_cfg: the text-only run is not edited
            t = torch.log_softmax(last_logits(model, t_ids, t_mask), -1)
            first = mm if first is None else first
            logp = torch.log_softmax(mm, -1)
            guided = gamma * (logp - t) + t
            guided = guided.masked_fill(logp < math.log(0.1) + logp.max(-1, keepdim=True).values, float("-inf"))
            token = guided.argmax(-1, keepdim=True)
            new.append(token)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            t_ids, t_mask = torch.cat([t_ids, token], 1), torch.cat([t_mask, torch.ones_like(token)], 1)
            image = torch.cat([image, torch.zeros_like(token, dtype=torch.bool)], 1)
    finally:
        REFERENCE["steer"] = None
        ours(model)
    return torch.cat(new, 1), first


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("gamma", [1.0, 1.1])
def test_pai_equals_its_published_formula(llava_dir, images, batch, gamma):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = methods.PaiConfig(alpha=0.5, gamma=gamma, start_layer=1)
    kwargs = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "output_logits": True}
    got = methods.pai_generate(adapter, images[:batch], QUESTIONS[:batch], config, **kwargs)
    inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    if batch == 2:
        assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    tokens, first = pai_reference(model, processor, inputs, QUESTIONS[:batch], 0.5, gamma, 1)
    assert torch.equal(got.tokens, tokens)
    assert torch.allclose(got.first_logits.float(), first, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("threshold", [0.0, 1.0])  # every sample above (weight2) / below (weight1) it
def test_adaptvis_equals_its_published_formula(llava_dir, images, batch, threshold):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = methods.AdaptVisConfig(threshold=threshold, weight1=0.5, weight2=2.0)
    kwargs = {"max_new_tokens": STEPS, "do_sample": False, "output_logits": True}
    got = methods.adaptvis_generate(adapter, images[:batch], QUESTIONS[:batch], config, **kwargs)
    inputs = llava_batch(processor, images[:batch], QUESTIONS[:batch])
    eager(model)
    try:
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_scores=True)
        confidence = [round(float(torch.softmax(plain.scores[0][b], -1).max()), 2) for b in range(batch)]  # its np.round(max(softmax), 2)
        weights = torch.tensor([0.5 if c < threshold else 2.0 for c in confidence])
        image = inputs["input_ids"] == model.config.image_token_id
        layers = frozenset(range(model.config.text_config.num_hidden_layers))  # its `idx < 32`: every layer of a 7B
        REFERENCE["steer"] = {"layers": layers, "cols": image, "kind": "scale", "value": weights, "prefill_only": True}
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    finally:
        REFERENCE["steer"] = None
        ours(model)
    assert [d["adaptvis_weight"] for d in got.details] == weights.tolist()
    assert torch.equal(got.tokens, expected.sequences[:, inputs["input_ids"].shape[1] :])
    assert torch.allclose(got.first_logits.float(), expected.logits[0].float(), atol=1e-4, rtol=0)


def test_settings_from_model_args_are_checked():
    assert methods.config_from_args("pai", {"alpha": "0.3", "gamma": "1"}) == methods.PaiConfig(alpha=0.3, gamma=1.0)
    with pytest.raises(methods.MethodConfigError, match="unknown settings"):
        methods.config_from_args("adaptvis", {"weight": "2"})
    with pytest.raises(methods.MethodConfigError, match="out of range"):
        methods.config_from_args("adaptvis", {"threshold": "1.5"})


@pytest.mark.parametrize(("method", "args"), [("pai", ""), ("adaptvis", ""), ("vicrop", ",layer=1")])
def test_method_ids_answer_through_the_registry_and_say_what_they_did(method, args, llava_dir, images):
    from lmms_eval.models import get_model
    from test_models import make_requests

    from lmms_vg import outputs
    from lmms_vg.grounding import GroundingRecord

    wrapper = get_model(f"huatuo_{method}").create_from_arg_string(f"pretrained={llava_dir},device=cpu{args}", {"batch_size": 2})
    answers = [
        outputs.decode(o) for o in wrapper.generate_until(make_requests(wrapper, images, QUESTIONS, {"max_new_tokens": 3, "lmms_vg": {}}))
    ]
    assert all(a.method["name"] == method for a in answers)
    if method == "adaptvis":  # the tiny model is unsure of everything: weight1 for every sample
        assert all(a.method["adaptvis_confidence"] < 0.3 and a.method["adaptvis_weight"] == 0.5 for a in answers)
    if method == "vicrop":
        assert all(len(a.method["vicrop_box"]) == 4 and a.method["vicrop_layer"] == 1 for a in answers)
    gen = {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}}
    records = [GroundingRecord.from_output(r) for r in wrapper.generate_until(make_requests(wrapper, images, QUESTIONS, gen))]
    assert all(r.skipped is None and len(r.kl) == 3 for r in records)  # grounding under the method


def test_method_settings_belong_to_their_ids(llava_dir):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="alpha: settings of the _pai / _adaptvis / _vicrop ids"):
        get_model("huatuo").create_from_arg_string(f"pretrained={llava_dir},device=cpu,alpha=0.3", {})
    with pytest.raises(methods.MethodConfigError, match="pai: unknown settings \\['threshold'\\]"):
        get_model("huatuo_pai").create_from_arg_string(f"pretrained={llava_dir},device=cpu,threshold=0.3", {})
    wrapper = get_model("huatuo_pai").create_from_arg_string(f"pretrained={llava_dir},device=cpu,alpha=0.7,gamma=1", {})
    assert wrapper.method_config == methods.PaiConfig(alpha=0.7, gamma=1.0)


@pytest.mark.parametrize("method", ["pai", "adaptvis"])
def test_grounding_under_a_method_equals_eager_maps_under_its_formula(method, llava_dir, images):
    """Question and generic-prompt maps on the shared image prefix, under the method's steer, equal an eager forward's."""
    from lmms_vg.grounding import GroundingRunner
    from lmms_vg.prompts import GENERIC_PROMPT

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    config = methods.PaiConfig(alpha=0.5, start_layer=1) if method == "pai" else methods.AdaptVisConfig(threshold=1.0, weight1=3.0)
    runner = GroundingRunner(adapter, GENERIC_PROMPT, steering=methods.steering(method, config, adapter))
    question, reference = runner.question_and_reference_maps(images, QUESTIONS, [None, None])
    n_layers = model.config.text_config.num_hidden_layers
    eager(model)
    try:
        for b, (image, text) in enumerate(zip(images, QUESTIONS)):
            if method == "adaptvis":  # its weight comes from the question's own confidence (here every sample below 1.0: weight1)
                spec = {"layers": frozenset(range(n_layers)), "kind": "scale", "value": torch.tensor([3.0]), "prefill_only": True}
            else:
                spec = {"layers": frozenset(range(1, n_layers)), "kind": "amplify", "value": torch.tensor([0.5]), "prefill_only": False}
            for prompt, maps in ((text, question), (GENERIC_PROMPT, reference)):
                inputs = llava_batch(processor, [image], [prompt])
                cols = inputs["input_ids"][0] == model.config.image_token_id
                REFERENCE["steer"] = {**spec, "cols": cols[None]}
                with torch.no_grad():
                    attentions = model(**inputs, output_attentions=True).attentions
                expected = torch.stack([a[0, :, -1, cols] for a in attentions])  # [L, H, N]
                assert torch.allclose(maps[b], expected.float(), atol=1e-5, rtol=0), (method, b, prompt)
    finally:
        REFERENCE["steer"] = None
        ours(model)


def vicrop_reference_box(att_map, image_size, bbox_size):
    """mllms_know's bbox_from_att_image_adaptive, written with array operations: window sums by 2-D correlation, the
    first maximum in its column-major scan, the sharpest ratio, the centred crop clamped inside the image."""
    import numpy as np
    from scipy.signal import correlate2d

    rows, cols = att_map.shape
    bw, bh = image_size[0] / cols, image_size[1] / rows
    candidates = []
    for ratio in (1, 1.2, 1.4, 1.6, 1.8, 2):
        nx, ny = min(int(bbox_size * ratio / bw), cols), min(int(bbox_size * ratio / bh), rows)
        if cols - nx < 1 and rows - ny < 1:
            if ratio == 1:
                return 0, 0, image_size[0], image_size[1]
            continue
        sums = correlate2d(att_map, np.ones((ny, nx)), mode="valid")
        x, y = divmod(int(np.argmax(sums.T)), sums.shape[0])  # x-major order, first maximum
        around = [
            sums[y + dy, x + dx]
            for dy, dx in ((0, -1), (0, 1), (-1, 0), (1, 0))
            if 0 <= y + dy < sums.shape[0] and 0 <= x + dx < sums.shape[1]
        ]
        candidates.append(((sums[y, x] - np.mean(around)) / (nx * ny), ratio, x, y, nx, ny))
    _, ratio, x, y, nx, ny = max(candidates, key=lambda c: c[0])  # max keeps the first of equal differences, as argmax
    half = bbox_size * ratio // 2
    cx = min(max(int(x * bw + bw * nx / 2), half), image_size[0] - half)
    cy = min(max(int(y * bh + bh * ny / 2), half), image_size[1] - half)
    return max(0, cx - half), max(0, cy - half), min(image_size[0], cx + half), min(image_size[1], cy + half)


@pytest.mark.parametrize("batch", [1, 2])
def test_vicrop_equals_its_published_method(llava_dir, images, batch):
    """Relative attention at the layer (eager, head mean, last token) -> its crop search -> the answer from image + crop."""
    from PIL import Image

    from lmms_vg.prompts import GENERIC_PROMPT, SHORT_ANSWER

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    wide = [Image.fromarray(__import__("numpy").asarray(img.resize((150, 90)))) for img in images]  # crops smaller than the image
    config = methods.ViCropConfig(layer=1, bbox_size=40)
    kwargs = {"max_new_tokens": STEPS, "do_sample": False, "output_logits": True}
    got = methods.vicrop_generate(adapter, wide[:batch], QUESTIONS[:batch], config, **kwargs)
    eager(model)
    try:
        expected_boxes, crops = [], []
        for image, question in zip(wide[:batch], QUESTIONS[:batch]):
            maps = []
            for prompt in (question, GENERIC_PROMPT + SHORT_ANSWER):
                inputs = llava_batch(processor, [image], [prompt])
                cols = inputs["input_ids"][0] == model.config.image_token_id
                with torch.no_grad():
                    maps.append(model(**inputs, output_attentions=True).attentions[1][0, :, -1, cols].mean(0))
            side = int(maps[0].numel() ** 0.5)
            box = vicrop_reference_box((maps[0] / maps[1]).reshape(side, side).numpy(), image.size, 40)
            expected_boxes.append([round(float(v), 2) for v in box])
            crops.append(image.crop(box))
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": f"<image>\n<image>\n{q}"}], tokenize=False, add_generation_prompt=True
            )
            for q in QUESTIONS[:batch]
        ]
        pairs = [img for pair in zip(wide[:batch], crops) for img in pair]
        inputs = processor(images=[adapter.model_image(i) for i in pairs], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    finally:
        ours(model)
    assert [d["vicrop_box"] for d in got.details] == expected_boxes
    assert any(box != [0, 0, 150, 90] for box in expected_boxes), "the crop must not be the whole image for the test to mean anything"
    assert torch.equal(got.tokens, expected.sequences[:, inputs["input_ids"].shape[1] :])
    assert torch.allclose(got.first_logits.float(), expected.logits[0].float(), atol=1e-4, rtol=0)


def test_vicrop_box_search_on_many_maps():
    """The crop search against the array-operation reference, over map shapes, image sizes and base sizes."""
    import numpy as np

    rng = np.random.default_rng(0)
    for trial in range(60):
        rows, cols = [(24, 24), (8, 12), (6, 6), (16, 10)][trial % 4]
        att = rng.random((rows, cols)) ** 4  # peaked, as relative attention is
        size = (int(rng.integers(200, 1200)), int(rng.integers(200, 1200)))
        bbox = int(rng.choice([224, 336]))
        assert methods.vicrop_box(att, size, bbox) == pytest.approx(vicrop_reference_box(att, size, bbox)), (trial, size, bbox)


def test_vicrop_on_a_dynamic_resolution_model_with_images_of_two_sizes(qwen2_vl_dir, images):
    """Qwen2-VL: images of different grids in one batch (one shared prefix per grid), each answered with its crop."""
    from lmms_eval.models import get_model
    from test_models import make_requests

    from lmms_vg import outputs

    wrapper = get_model("qwen25vl_vicrop").create_from_arg_string(f"pretrained={qwen2_vl_dir},device=cpu,layer=1", {"batch_size": 2})
    pair = [images[0], images[1].resize((60, 150))]
    assert wrapper.adapter.image_tokens(pair[0]) != wrapper.adapter.image_tokens(pair[1])
    answers = [
        outputs.decode(o) for o in wrapper.generate_until(make_requests(wrapper, pair, QUESTIONS, {"max_new_tokens": 2, "lmms_vg": {}}))
    ]
    assert all(a.method["name"] == "vicrop" and len(a.method["vicrop_box"]) == 4 for a in answers)
