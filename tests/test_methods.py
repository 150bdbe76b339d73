"""PAI and AdaptVis against references written here from their published code (an eager attention that
edits the logits as theirs does, a step-by-step greedy loop with PAI's guidance formula): same tokens,
logits within 1e-4 in fp32, for one prompt and a left-padded batch."""

import math

import pytest
import torch
from reference_attention import REFERENCE
from test_engine import QUESTIONS, llava_batch, load_llava

from lmms_vg import engine, methods
from lmms_vg.demo import tiny
from lmms_vg.families.llava import LlavaAdapter

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


def pai_text_only_ids(tokenizer, prompt: str) -> list[int]:
    """PAI's text-only prompt (LALBJ/PAI @ 9bbd8bd, model_loader.py ``init_cfg_processor``): the text before the image
    and the text after it, each tokenised without special tokens, BOS first (where the tokenizer has one)."""
    before, after = prompt.split("<image>")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(before, add_special_tokens=False)["input_ids"] + tokenizer(after, add_special_tokens=False)["input_ids"]


def pai_reference(model, processor, inputs, questions, alpha, gamma, start_layer):
    """PAI as LALBJ/PAI @ 9bbd8bd runs it, its control flow transcribed (one full forward per step, no cache):

    - ``llama_modify(..., use_attn, alpha, use_cfg, ...)`` sets the flags on layers start_layer..last; its README runs
      guidance with ``--use-cfg`` (gamma 1.1); gamma 1 here is a run without it;
    - ``llama_new_forward`` edits ``attn_weights[:, :, -1, img]`` (after the mask) iff ``use_attn and not use_cfg``;
    - ``CFGLogits.__call__`` (after each forward): log-softmax; gamma 1 returns it; else it sets ``use_cfg`` for its own
      text-only run, then clears it (the edit is on from the next forward), guides and cuts at 0.1 x the top.
    """
    layers = frozenset(range(start_layer, model.config.text_config.num_hidden_layers))
    flags = {"use_attn": True, "use_cfg": gamma != 1}
    image = inputs["input_ids"] == model.config.image_token_id
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    rows = [pai_text_only_ids(processor.tokenizer, p) for p in prompts]
    width = max(map(len, rows))
    pad = processor.tokenizer.pad_token_id
    t_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    t_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def cfg_logits(scores, text_ids, text_mask):
        scores = torch.log_softmax(scores, -1)
        if gamma == 1:
            return scores
        flags["use_cfg"] = True
        REFERENCE["steer"] = None  # its text-only run: use_cfg is set, nothing edited
        uncond = torch.log_softmax(last_logits(model, text_ids, text_mask), -1)
        flags["use_cfg"] = False
        cutoff = math.log(0.1) + scores.max(-1, keepdim=True).values
        return (gamma * (scores - uncond) + uncond).masked_fill(scores < cutoff, float("-inf"))

    eager(model)
    first, new = None, []
    try:
        for _ in range(STEPS):
            edit = flags["use_attn"] and not flags["use_cfg"]
            REFERENCE["steer"] = (
                {"layers": layers, "cols": image, "kind": "amplify", "value": torch.full((ids.shape[0],), alpha), "steps": "all"}
                if edit
                else None
            )
            mm = last_logits(model, ids, mask, inputs["pixel_values"])
            first = mm if first is None else first
            token = cfg_logits(mm, t_ids, t_mask).argmax(-1, keepdim=True)
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
def test_pai_equals_its_published_code(llava_dir, images, batch, gamma):
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
    with torch.no_grad():
        plain = last_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    # with guidance the first token's logits are the unedited ones (the edit starts at the second); without, edited
    assert torch.allclose(first, plain, atol=1e-4) == (gamma != 1)


def test_pai_text_only_prompt_tokenises_the_two_sides_apart(tmp_path, llava_dir):
    """Where tokenising the prompt without its image in one go merges across the gap ("\n\n"), PAI's two sides do not."""
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    adapter.tokenizer = tiny.build_tokenizer(extra_corpus="\n\n\n\n" * 50, qwen2_split=True)  # "\n\n" one token, as Qwen2's
    adapter.tokenizer.chat_template = processor.tokenizer.chat_template
    prompt = adapter.prompt(QUESTIONS[0])
    expected = pai_text_only_ids(adapter.tokenizer, prompt)
    assert adapter.text_only_ids(QUESTIONS[0]) == expected
    assert adapter.tokenizer(prompt.replace("<image>", ""))["input_ids"] != expected  # the test tells the two apart


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
        REFERENCE["steer"] = {"layers": layers, "cols": image, "kind": "scale", "value": weights, "steps": "prefill"}
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


@pytest.mark.parametrize("method", ["pai:1", "pai:1.1", "adaptvis"])
def test_grounding_under_a_method_equals_eager_maps_under_its_formula(method, llava_dir, images):
    """Question and generic-prompt maps on the shared image prefix, under the method's steer, equal an eager forward's."""
    from lmms_vg.grounding import GroundingRunner
    from lmms_vg.prompts import GENERIC_PROMPT

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    name, _, gamma = method.partition(":")
    config = methods.PaiConfig(alpha=0.5, gamma=float(gamma), start_layer=1) if name == "pai" else methods.AdaptVisConfig(1.0, 3.0)
    steering = methods.steering(name, config, adapter)
    assert (steering is None) == (method == "pai:1.1")  # with guidance PAI's prompt pass is not edited: no steer
    runner = GroundingRunner(adapter, GENERIC_PROMPT, steering=steering)
    question, reference = runner.question_and_reference_maps(images, QUESTIONS, [None, None])
    n_layers = model.config.text_config.num_hidden_layers
    eager(model)
    try:
        for b, (image, text) in enumerate(zip(images, QUESTIONS)):
            if name == "adaptvis":  # its weight comes from the question's own confidence (here every sample below 1.0: weight1)
                spec = {"layers": frozenset(range(n_layers)), "kind": "scale", "value": torch.tensor([3.0]), "steps": "prefill"}
            elif method == "pai:1":  # without guidance the edit acts in the prompt's pass
                spec = {"layers": frozenset(range(1, n_layers)), "kind": "amplify", "value": torch.tensor([0.5]), "steps": "all"}
            else:  # with guidance its first forward (the prompt's) is not edited
                spec = None
            for prompt, maps in ((text, question), (GENERIC_PROMPT, reference)):
                inputs = llava_batch(processor, [image], [prompt])
                cols = inputs["input_ids"][0] == model.config.image_token_id
                REFERENCE["steer"] = None if spec is None else {**spec, "cols": cols[None]}
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


def vicrop_reference_maps(model, processor, image, short_question):
    """Its rel_attention_llava at our layer 1: the short question + its suffix over the generic prompt + the same suffix
    (run.py), eager attention, head mean, last token, no epsilon."""
    from lmms_vg.prompts import GENERIC_PROMPT

    maps = []
    for prompt in (
        f"{short_question} Answer the question using a single word or phrase.",
        f"{GENERIC_PROMPT} Answer the question using a single word or phrase.",
    ):
        inputs = llava_batch(processor, [image], [prompt])
        cols = inputs["input_ids"][0] == model.config.image_token_id
        with torch.no_grad():
            maps.append(model(**inputs, output_attentions=True).attentions[1][0, :, -1, cols].mean(0))
    side = int(maps[0].numel() ** 0.5)
    return (maps[0] / maps[1]).reshape(side, side).numpy()


def reference_high_res_blocks(image):
    """Its utils.py high_res_split_threshold (1024 px), transcribed."""
    import numpy as np

    vertical_split = int(np.ceil(image.size[1] / 1024))
    horizontal_split = int(vertical_split * image.size[0] / image.size[1])
    split_size = int(np.ceil(image.size[0] / horizontal_split)), int(np.ceil(image.size[1] / vertical_split))
    blocks = [
        image.crop((i * split_size[0], j * split_size[1], (i + 1) * split_size[0], (j + 1) * split_size[1]))
        for j in range(vertical_split)
        for i in range(horizontal_split)
    ]
    return blocks, vertical_split, horizontal_split


@pytest.mark.parametrize(("batch", "high_res"), [(1, False), (2, False), (1, True), (2, True)])
def test_vicrop_equals_its_published_method(llava_dir, images, batch, high_res):
    """Relative attention on the short question (its run.py prompt) at the layer -> its crop search (on the joined block
    maps with rel_att_high) -> the answer from the task's prompt with the image and the crop."""
    import numpy as np
    from PIL import Image

    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    size = (1100, 1500) if high_res else (150, 90)  # tall: two blocks of at most 1024 px
    wide = [Image.fromarray(np.asarray(img.resize(size))) for img in images]  # crops smaller than the image
    short = ["Where is the lesion?", "Is it round?"][:batch]
    prompts = [f"{q}\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly." for q in short]
    config = methods.ViCropConfig(layer=1, bbox_size=400 if high_res else 40, high_res=high_res)
    kwargs = {"max_new_tokens": STEPS, "do_sample": False, "output_logits": True}
    asked = [f"{q} Answer the question using a single word or phrase." for q in short]
    got = methods.vicrop_generate(adapter, wide[:batch], prompts, config, attention_texts=asked, **kwargs)
    eager(model)
    try:
        expected_boxes, crops = [], []
        for image, question in zip(wide[:batch], short):
            if high_res:
                blocks, rows, cols = reference_high_res_blocks(image)
                tiles = [vicrop_reference_maps(model, processor, b, question) for b in blocks]
                att = np.block([tiles[j : j + cols] for j in range(0, cols * rows, cols)])
            else:
                att = vicrop_reference_maps(model, processor, image, question)
            box = vicrop_reference_box(att, image.size, config.bbox_size)
            expected_boxes.append([round(float(v), 2) for v in box])
            crops.append(image.crop(box))
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": f"<image>\n<image>\n{p}"}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        pairs = [img for pair in zip(wide[:batch], crops) for img in pair]
        inputs = processor(images=[adapter.model_image(i) for i in pairs], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
    finally:
        ours(model)
    assert [d["vicrop_box"] for d in got.details] == expected_boxes
    assert [d["vicrop_attention_prompt"] for d in got.details] == asked
    assert any(box != [0, 0, *size] for box in expected_boxes), "the crop must not be the whole image for the test to mean anything"
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


def test_the_reports_method_names_are_the_methods_labels():
    from lmms_vg import report
    from lmms_vg.presets import METHODS as LISTED

    assert {name: cls.label for name, cls in methods.METHODS.items()} == report.METHOD_NAMES
    assert set(LISTED) == set(methods.METHODS)  # every method has its model-id twins
