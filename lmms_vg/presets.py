"""Model presets: data, one record per model id. Adding a LLaVA-family model is adding a record.

``heads`` names a VGRefine head preset (``lmms_vg/heads/<name>.json``) or is None when none was
published (run calibration: README 'VGRefine').
"""

from __future__ import annotations

from dataclasses import dataclass

HUATUO_TEMPLATE = "{% for message in messages %}<|user|>\n{{ message['content'] }}\n<|assistant|>\n{% endfor %}"
MISTRAL_INST_TEMPLATE = "{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"
VICUNA_TEMPLATE = (
    "{% for message in messages %}A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: {{ message['content'] }} ASSISTANT:{% endfor %}"
)


@dataclass(frozen=True)
class ModelPreset:
    model_id: str
    checkpoint: str
    chat_template: str | None  # None: the tokenizer's own
    pad_to_square: bool  # the original model pads to square (LLaVA-1.5 expand2square)
    heads: str | None = None
    knockout_layers: tuple[int, ...] = ()
    note: str = ""


PRESETS: dict[str, ModelPreset] = {
    p.model_id: p
    for p in (
        ModelPreset("huatuo", "FreedomIntelligence/HuatuoGPT-Vision-7B-hf", HUATUO_TEMPLATE, True, "huatuo_7b", (16,)),
        ModelPreset("huatuo_34b", "FreedomIntelligence/HuatuoGPT-Vision-34B-hf", HUATUO_TEMPLATE, True, None, (), "no published heads: calibrate"),
        ModelPreset("llava_med", "chaoyinshe/llava-med-v1.5-mistral-7b-hf", MISTRAL_INST_TEMPLATE, True, None, (), "no published heads: calibrate"),
        ModelPreset("llava15", "llava-hf/llava-1.5-7b-hf", VICUNA_TEMPLATE, False, None, (), "general-domain reference; llava-hf's processor resizes and centre-crops"),
    )
}
