"""Every model id's prompt and tokenisation against its original code.

``tests/data/chat_templates.json`` holds, per model id, the prompt its original code builds for one
question (written by running that repository's own conversation code at the commit named in the
fixture) and how that code tokenises it. The tokenisation functions below are transcribed from the
originals (repository, path, commit in each docstring) and run on tokenizers with the behaviours
that make the ways differ: a BOS added by the tokenizer and a SentencePiece-style dummy prefix.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmms_vg import adapters
from lmms_vg.conformance import huatuo_tokenizer_image_token, llava_tokenizer_image_token  # transcribed from the originals
from lmms_vg.demo import tiny
from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
from lmms_vg.presets import GENERIC_MODEL_ID, PRESETS, family_of, load_families

load_families()

FIXTURE = json.loads((Path(__file__).parent / "data" / "chat_templates.json").read_text())
SHIPPED = dict(PRESETS)  # as collected: other tests register presets of their own later
QUESTION = FIXTURE["question"]
IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
# ids whose original is this repository: the demo model was trained on HuatuoGPT-Vision's prompt (lmms_vg/demo/train.py)
OWN = {"lmms_vg_demo": "huatuo"}


def original_of(model_id: str) -> dict:
    return FIXTURE["ids"][OWN.get(model_id, model_id)]


def test_every_model_id_has_its_original():
    """A preset without a fixture from its original's code fails here (the generic id takes the checkpoint's own template)."""
    missing = sorted(set(SHIPPED) - set(FIXTURE["ids"]) - set(OWN))
    assert not missing, f"no original conversation fixture for {missing}: add one to tests/data/chat_templates.json"
    for entry in FIXTURE["ids"].values():
        assert {"repo", "commit", "path", "conversation", "how"} <= set(entry["source"]) and len(entry["source"]["commit"]) == 40
    assert GENERIC_MODEL_ID not in SHIPPED


def prompt_of(model_id: str) -> str:
    """The prompt lmms-vg's adapter for the id builds for the fixture's question (no model needed to write a prompt)."""
    preset = PRESETS[model_id]
    special = ("<image>", "<IMG_CONTEXT>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<bos>")
    tokenizer = tiny.build_tokenizer(extra_special=special, image_token=False, bos="<bos>")  # a template may write it (Gemma 3)
    tokenizer.chat_template = preset.chat_template or original_of(model_id)["checkpoint_template"]
    adapter_class = family_of(preset.family).adapter
    adapter = adapter_class.__new__(adapter_class)
    adapter.tokenizer, adapter.context = tokenizer, "<IMG_CONTEXT>"
    return adapter.prompt(QUESTION)


@pytest.mark.parametrize("model_id", sorted(SHIPPED))
def test_prompt_equals_what_the_original_code_builds(model_id):
    original = original_of(model_id)
    assert prompt_of(model_id) == original["prompt"], original["source"]
    assert PRESETS[model_id].tokenisation == original["tokenisation"], original["source"]["how"]


def internvl_chat_ids(prompt: str, tokenizer) -> list[int]:
    """xmed-lab/MedRegA @ dfdb0db, modeling_internvl_chat.py ``chat``: ``tokenizer(query)`` on the whole prompt (the image
    token stands for the expanded context tokens here)."""
    return [IMAGE if t == tokenizer.convert_tokens_to_ids("<image>") else t for t in tokenizer(prompt).input_ids]


ORIGINAL_TOKENISERS = {"llava": llava_tokenizer_image_token, "huatuo": huatuo_tokenizer_image_token, "whole": internvl_chat_ids}


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A tokenizer with Llama-2's and Mistral's behaviours: BOS added by default, a dummy prefix on each call's first word."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False)
    tok.train_from_iterator([QUESTION + " USER: ASSISTANT: [INST] [/INST] A chat between a curious user\n"] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.mark.parametrize("style", sorted(ORIGINAL_TOKENISERS))
@pytest.mark.parametrize("kind", ["sentencepiece", "qwen2"])
def test_prompt_chunks_follow_each_original_tokeniser(style, kind):
    """Ours (chunks + image tokens) equals the transcribed original, for a BOS/dummy-prefix tokenizer and a Qwen2-like one."""
    tokenizer = sentencepiece_like() if kind == "sentencepiece" else tiny.build_tokenizer(qwen2_split=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for prompt in (PRESETS_PROMPT["llava_med"], PRESETS_PROMPT["vila_m3_13b"], "<image>\n<image>\nTwo images. ASSISTANT:"):
        ours = adapters.with_images(
            adapters.prompt_chunks(tokenizer, prompt, "<image>", image_id, style), IMAGE, [1] * prompt.count("<image>")
        )
        assert ours == ORIGINAL_TOKENISERS[style](prompt, tokenizer), (style, kind, prompt)


def test_the_three_ways_differ_where_the_tokenizer_adds_bos_and_a_prefix():
    """So choosing the original's way matters: on a Llama-2-like tokenizer no two of them agree."""
    tokenizer = sentencepiece_like()
    prompt = PRESETS_PROMPT["llava_med"]
    found = {style: tuple(fn(prompt, tokenizer)) for style, fn in ORIGINAL_TOKENISERS.items()}
    assert len(set(found.values())) == 3, found
    assert found["llava"][0] == tokenizer.bos_token_id and found["huatuo"][0] != tokenizer.bos_token_id


PRESETS_PROMPT = {mid: original_of(mid)["prompt"] for mid in ("llava_med", "vila_m3_13b")}


def test_a_model_id_encodes_as_its_original(tmp_path, images):
    """Through the registry: huatuo (HuatuoGPT-Vision's chunks, no special tokens) and llava_med (LLaVA's, one BOS) on a
    checkpoint whose tokenizer adds BOS: the model's input ids are the originals'."""
    from lmms_eval.models import get_model
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    checkpoint = tiny.build_llava(tmp_path / "bos", family="llama")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.save_pretrained(checkpoint)
    for model_id, original in (("huatuo", huatuo_tokenizer_image_token), ("llava_med", llava_tokenizer_image_token)):
        wrapper = get_model(model_id).create_from_arg_string(f"pretrained={checkpoint},device=cpu", {})
        adapter = wrapper.adapter
        n = adapter.image_tokens(images[0])
        expected = []
        for token in original(adapter.prompt(QUESTION), adapter.tokenizer):
            expected += [adapter.image_token_id] * n if token == IMAGE else [token]
        ids = adapter.encode([images[0]], [QUESTION])["input_ids"][0].tolist()
        assert ids == expected, model_id
        split = adapter.split_prompts([images[0]], [QUESTION])
        assert split.prefix[0] + split.suffix[0] == expected
        assert (expected[0] == bos) == (model_id == "llava_med")  # HuatuoGPT-Vision's code adds no BOS, LLaVA's does
    assert torch.is_tensor(adapter.encode([images[0]], [QUESTION])["pixel_values"])


def test_qwen_ids_lay_out_the_model_cards_message(qwen2_vl_dir):
    """The Qwen family's prompt is the checkpoint's template over the model card's message (image parts, then the text)."""
    model_id = "qwen25vl"
    assert prompt_of(model_id) == FIXTURE["ids"][model_id]["prompt"]
    adapter = SimpleNamespace(tokenizer=tiny.build_tokenizer(extra_special=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")))
    adapter.tokenizer.chat_template = FIXTURE["ids"][model_id]["checkpoint_template"]
    two = Qwen2VLAdapter.prompt(adapter, QUESTION, n_images=2)
    assert two.count("<|vision_start|><|image_pad|><|vision_end|>") == 2 and two.index("<|image_pad|>") < two.index("Is there")
