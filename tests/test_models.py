"""Every model id, loaded through lmms-eval's registry on a tiny checkpoint of its architecture."""

import json

import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

from lmms_vg.demo import tiny
from lmms_vg.grounding import GroundingRecord
from lmms_vg.methods.vgrefine import VGRefineConfigError
from lmms_vg_models.loading import ModelLoadError

# model id -> (text family, heads, kv heads): the real models' families and head ratios, scaled down
ARCHS = {
    "huatuo": ("qwen2", 7, 1),  # HuatuoGPT-Vision-7B: Qwen2, 28 heads / 4 KV
    "huatuo_34b": ("llama", 7, 1),  # -34B: Yi-1.5 (Llama architecture), 56 / 8
    "llava_med": ("mistral", 4, 1),  # Mistral-7B, 32 / 8
    "llava15": ("llama", 4, 4),  # Vicuna-7B, 32 / 32
    "lmms_vg_llava": ("qwen2", 4, 2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        mid: tiny.build_llava(tmp_path_factory.mktemp(mid), family=fam, heads=h, kv_heads=kv, hidden=8 * h, pad_to_square=mid != "llava15")
        for mid, (fam, h, kv) in ARCHS.items()
    }


def make_requests(wrapper, images, questions, gen_kwargs):
    docs = [{"image": img, "question": q, "vg_boxes": [[10.0, 10.0, 60.0, 50.0]]} for img, q in zip(images, questions)]
    wrapper.task_dict = {"t": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["image"]]

    meta = [{"task": "t", "doc_id": i, "repeats": 1} for i in range(len(questions))]
    return [
        Instance("generate_until", (q, json.loads(json.dumps(gen_kwargs)), doc_to_visual, i, "t", "test"), i, m)
        for i, (q, m) in enumerate(zip(questions, meta))
    ]


@pytest.mark.parametrize("model_id", sorted(ARCHS))
def test_model_id_loads_generates_and_captures(model_id, checkpoints, images):
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={checkpoints[model_id]},device=cpu", {"batch_size": 2})
    questions = ["What is shown?", "Where is the lesion in this image?"]
    answers = wrapper.generate_until(make_requests(wrapper, images, questions, {"max_new_tokens": 4, "until": ["\n\n"]}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    records = wrapper.generate_until(
        make_requests(wrapper, images, questions, {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}})
    )
    n_layers = wrapper.model.config.text_config.num_hidden_layers
    for raw in records:
        rec = GroundingRecord.from_output(raw)
        assert rec.skipped is None and len(rec.kl) == n_layers
    # the captured map covers the model's own token grid: 112 px / 14 = 8 x 8
    runner = next(iter(wrapper._grounding.values()))
    q, ref = runner.question_and_reference_maps(images, questions, [None, None])
    heads = wrapper.model.config.text_config.num_attention_heads
    assert q.shape == (2, n_layers, heads, 64) and ref.shape == q.shape
    t = wrapper.adapter.transform(images[0])
    assert (t.rows, t.cols) == (8, 8)


def test_llava15_geometry_is_resize_and_crop(checkpoints, images):
    wrapper = get_model("llava15").create_from_arg_string(f"pretrained={checkpoints['llava15']},device=cpu")
    t = wrapper.adapter.transform(images[0])  # 130 x 90: shortest edge 90 -> 112, width 161, crop 24 px each side
    assert t.scale_y == pytest.approx(112 / 90) and t.offset_x == pytest.approx(-((int(112 * 130 / 90) - 112) // 2))


def test_vgrefine_twins_check_their_heads_before_any_sample(checkpoints):
    with pytest.raises(VGRefineConfigError, match="do not exist"):
        get_model("huatuo_vgrefine").create_from_arg_string(f"pretrained={checkpoints['huatuo']},device=cpu")
    with pytest.raises(ValueError, match="calibration"):
        get_model("llava_med_vgrefine").create_from_arg_string(f"pretrained={checkpoints['llava_med']},device=cpu")
    with pytest.raises(VGRefineConfigError, match="outside"):
        get_model("lmms_vg_llava_vgrefine").create_from_arg_string(
            f"pretrained={checkpoints['lmms_vg_llava']},device=cpu,heads=huatuo_7b,percentile=120"
        )


def test_bad_checkpoints_say_what_to_do(tmp_path, qwen2_vl_dir):
    cls = get_model("lmms_vg_llava")
    with pytest.raises(ModelLoadError, match="no config.json"):
        cls(pretrained=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="'qwen2_vl' checkpoint, not LlavaForConditionalGeneration"):
        cls(pretrained=str(qwen2_vl_dir), device="cpu")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(
        json.dumps({"model_type": "my_remote_vlm", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code=true"):
        cls(pretrained=str(remote), device="cpu")
    with pytest.raises(TypeError, match="unknown model_args"):
        cls(pretrained=str(tmp_path), device="cpu", temprature=0.3)


def test_authors_sampling_switch(checkpoints):
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={checkpoints['huatuo']},device=cpu,sampling=authors")
    kwargs, _ = wrapper._generation_kwargs({"max_new_tokens": 8})
    assert kwargs["temperature"] == 0.2 and kwargs["repetition_penalty"] == 1.2 and kwargs["max_new_tokens"] == 256 and kwargs["do_sample"]
    greedy = get_model("huatuo").create_from_arg_string(f"pretrained={checkpoints['huatuo']},device=cpu")
    assert greedy._generation_kwargs({"max_new_tokens": 8})[0]["do_sample"] is False
    torch.manual_seed(0)


QWEN_IDS = [("huatuo_qwen25vl", "qwen2_vl_dir"), ("lingshu", "qwen2_5_vl_dir"), ("qwen3vl", "qwen3_vl_dir")]


@pytest.mark.parametrize(("model_id", "checkpoint"), QWEN_IDS)
def test_qwen2_vl_ids_ground_and_refine(model_id, checkpoint, request, images, tmp_path):
    """Qwen2-VL family ids (HuatuoGPT-Vision-7B-Qwen2.5VL, Lingshu, Qwen3-VL) on a tiny checkpoint of their architecture."""
    checkpoint = request.getfixturevalue(checkpoint)
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={checkpoint},device=cpu", {"batch_size": 2})
    questions = ["What is shown?", "Where is the lesion in this image?"]
    answers = wrapper.generate_until(make_requests(wrapper, images, questions, {"max_new_tokens": 3}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    records = [
        GroundingRecord.from_output(r)
        for r in wrapper.generate_until(
            make_requests(wrapper, images, questions, {"max_new_tokens": 1, "lmms_vg": {"mode": "grounding", "boxes": "vg_boxes"}})
        )
    ]
    assert all(r.skipped is None and len(r.kl) == 3 for r in records)
    t = wrapper.adapter.transform(images[0])  # 130 x 90 -> smart resize to 140 x 84 -> 3 x 5 merged tokens (Qwen3-VL: 128 x 96, 3 x 4)
    runner = next(iter(wrapper._grounding.values()))
    q, _ = runner.question_and_reference_maps(images[:1], questions[:1], [None])
    assert q.shape[-1] == t.rows * t.cols
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[1, 0], [2, 1], [0, 3]], "knockout_layers": [1]}))
    refined = get_model(f"{model_id}_vgrefine").create_from_arg_string(
        f"pretrained={checkpoint},device=cpu,heads={heads}", {"batch_size": 2}
    )
    requests = make_requests(refined, images, questions, {"max_new_tokens": 3, "lmms_vg": {}})  # an lmms-vg task: typed answers
    outs = [json.loads(o) for o in refined.generate_until(requests)]
    assert all(o["knockout_layers"] == [1] and 0.3 <= o["knocked_fraction"] <= 0.7 for o in outs)


def test_vgrefine_settings_fail_before_the_checkpoint_loads(tmp_path):
    """A bad percentile is reported even when the checkpoint does not exist: nothing was loaded first."""
    with pytest.raises(VGRefineConfigError, match="outside"):
        get_model("huatuo_vgrefine")(pretrained=str(tmp_path / "not-there"), device="cpu", percentile=-1)
    with pytest.raises(VGRefineConfigError, match="top_k=40"):
        get_model("huatuo_vgrefine")(pretrained=str(tmp_path / "not-there"), device="cpu", top_k=40)


def test_loglikelihood_equals_hand_sum_of_token_logprobs(checkpoints, images):
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={checkpoints['huatuo']},device=cpu")
    docs = [{"image": images[0]}]
    wrapper.task_dict = {"t": {"test": docs}}
    request = Instance(
        "loglikelihood",
        ("What is shown?", " a red square", lambda d: [d["image"]], 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    ((logprob, greedy),) = wrapper.loglikelihood([request])
    prompt = wrapper.adapter.encode([images[0]], ["What is shown?"])
    cont = wrapper.tokenizer(" a red square", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], cont], 1)
    with torch.no_grad():
        logits = wrapper.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt["pixel_values"]).logits[0].float()
    start = prompt["input_ids"].shape[1]
    expected = sum(torch.log_softmax(logits[start - 1 + i], -1)[t].item() for i, t in enumerate(cont[0].tolist()))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert greedy == all(logits[start - 1 + i].argmax().item() == t for i, t in enumerate(cont[0].tolist()))


@pytest.mark.parametrize(("model_id", "checkpoint"), QWEN_IDS)
def test_loglikelihood_on_the_qwen2_vl_family(model_id, checkpoint, request, images):
    """The family's full inputs (grid, token types) reach the model; the sum equals one built here with the test's own
    Qwen batch (tests/test_engine.py qwen_batch) and the continuation appended as text tokens."""
    from test_engine import qwen_batch
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = request.getfixturevalue(checkpoint)
    wrapper = get_model(model_id).create_from_arg_string(f"pretrained={folder},device=cpu")
    wrapper.task_dict = {"t": {"test": [{"image": images[0]}]}}
    args = ("What is shown?", " a red square", lambda d: [d["image"]], 0, "t", "test")
    ((logprob, greedy),) = wrapper.loglikelihood([Instance("loglikelihood", args, 0, {"task": "t", "doc_id": 0, "repeats": 1})])
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    prompt = qwen_batch(wrapper.model, tokenizer, image_processor, [images[0]], ["What is shown?"])
    cont = tokenizer(" a red square", add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], cont], 1)
    inputs = {**prompt, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["mm_token_type_ids"] = (ids == wrapper.model.config.image_token_id).long()
    with torch.no_grad():
        logits = wrapper.model(**inputs).logits[0].float()
    start = prompt["input_ids"].shape[1]
    expected = sum(torch.log_softmax(logits[start - 1 + i], -1)[t].item() for i, t in enumerate(cont[0].tolist()))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert greedy == all(logits[start - 1 + i].argmax().item() == t for i, t in enumerate(cont[0].tolist()))


def test_head_level_is_parsed_strictly_and_each_setting_gets_its_runner(checkpoints, images):
    """A task's head_level "no" is false (bool("no") is not), and a later task asking for head level gets it (the runner
    cache keys on the setting); a word that is not a boolean is named."""
    wrapper = get_model("huatuo").create_from_arg_string(f"pretrained={checkpoints['huatuo']},device=cpu", {"batch_size": 2})
    questions = ["Where is it?", "What is it?"]

    def records(head_level):
        vg = {"mode": "grounding", "boxes": "vg_boxes", "head_level": head_level}
        return [GroundingRecord.from_output(o) for o in wrapper.generate_until(make_requests(wrapper, images, questions, {"lmms_vg": vg}))]

    assert all(r.head_kl is None for r in records("no"))
    assert all(r.head_kl is not None and len(r.head_kl) == 3 for r in records("yes"))
    assert all(r.skipped and "head_level" in r.skipped and "not a boolean" in r.skipped for r in records("perhaps"))
