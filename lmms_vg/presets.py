"""Model presets: data, one record per model id. Adding a LLaVA-family model is adding a record.

``heads`` names a VGRefine head ranking (``lmms_vg/heads/<name>.json``) or is None when none was
published (run calibration: README 'VGRefine').
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import (
    HERMES2_TEMPLATE,
    HUATUO_TEMPLATE,
    LLAMA3_LLAVA_TEMPLATE,
    MISTRAL_INST_TEMPLATE,
    VICUNA_V1_TEMPLATE,
    VILA_LLAMA3_TEMPLATE,
)

DEMO_CHECKPOINT = "lmms_vg:demo/model"  # inside the installed package


@dataclass(frozen=True)
class Family:
    """A model family: the adapter that tells the core about it and the transformers classes that load it.

    Adding a family is an adapter (:mod:`lmms_vg.adapters` shows two) plus one of these records
    (:func:`register_family`); presets then name it.
    """

    name: str
    adapter: str  # "module.Class" of its adapter, imported when a model of the family loads
    model_types: dict[str, str]  # config.model_type -> the transformers class that loads it
    pixel_limits: bool = False  # takes min_pixels / max_pixels (dynamic resolution)

    def adapter_class(self) -> type:
        return import_object(self.adapter)


def import_object(path: str):
    """``package.module.Name``, imported when asked for (presets stay plain data)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # LLaVA-1.5 and its relatives: a CLIP or ViT (BiomedCLIP) tower, or LLaVA's S2 multi-scale CLIP (LLaVA-Tri)
        Family(
            "llava",
            "lmms_vg.adapters.LlavaAdapter",
            {"llava": "LlavaForConditionalGeneration", "llava_s2": "lmms_vg.s2.LlavaS2ForConditionalGeneration"},
        ),
        # Qwen2-VL, Qwen2.5-VL (and Lingshu, a medical Qwen2.5-VL) and Qwen3-VL: the same prompt layout and
        # dynamic-resolution geometry (patch 14, or 16 for Qwen3-VL, read from the processor), M-RoPE positions
        Family(
            "qwen2_vl",
            "lmms_vg.adapters.Qwen2VLAdapter",
            {
                "qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                "qwen3_vl": "Qwen3VLForConditionalGeneration",
            },
            pixel_limits=True,
        ),
        # VILA (VILA-M3): SigLIP, 2 x 2 patch fold, Llama; built from transformers' parts (lmms_vg.vila)
        Family("vila", "lmms_vg.adapters.VilaAdapter", {"llava_vila": "lmms_vg.vila.VilaForConditionalGeneration"}),
        # InternVL-Chat (MedRegA): transformers' InternVL classes; ps_version v1 checkpoints keep their transposed shuffle
        Family(
            "internvl",
            "lmms_vg.adapters.InternVLAdapter",
            {"internvl_ps1": "lmms_vg.internvl.InternVLPs1ForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"},
        ),
    )
}


def register_family(family: Family) -> None:
    """Add a family at run time (e.g. from your own package); presets name it by ``family.name``."""
    FAMILIES[family.name] = family


@dataclass(frozen=True)
class ModelPreset:
    model_id: str
    checkpoint: str
    chat_template: str | None  # None: the tokenizer's own
    pad_to_square: bool  # the original model pads to square (LLaVA-1.5 expand2square)
    heads: str | None = None
    knockout_layers: tuple[int, ...] = ()
    note: str = ""
    family: str = "llava"  # a key of FAMILIES: llava (LlavaForConditionalGeneration) or qwen2_vl (Qwen2-VL / Qwen2.5-VL)
    max_images: int | None = None  # images per item the original inference code keeps (first ones); None: all
    tokenisation: str = "whole"  # how its original code tokenises a prompt (adapters.TOKENISATIONS): llava, huatuo or whole


PRESETS: dict[str, ModelPreset] = {
    p.model_id: p
    for p in (
        # HuatuoGPT-Vision's chatbot keeps at most 6 images per item (its max_image_num)
        ModelPreset(
            "huatuo",
            "FreedomIntelligence/HuatuoGPT-Vision-7B-hf",
            HUATUO_TEMPLATE,
            True,
            "huatuo_7b",
            (16,),
            max_images=6,
            tokenisation="huatuo",
        ),
        ModelPreset(
            "huatuo_34b",
            "FreedomIntelligence/HuatuoGPT-Vision-34B-hf",
            HUATUO_TEMPLATE,
            True,
            None,
            (),
            "no published heads: calibrate",
            max_images=6,
            tokenisation="huatuo",
        ),
        ModelPreset(
            "llava_med",
            "chaoyinshe/llava-med-v1.5-mistral-7b-hf",
            MISTRAL_INST_TEMPLATE,
            True,
            None,
            (),
            "no published heads: calibrate",
            tokenisation="llava",
        ),
        ModelPreset(
            "llava15",
            "llava-hf/llava-1.5-7b-hf",
            VICUNA_V1_TEMPLATE,
            False,
            None,
            (),
            "general-domain reference; llava-hf's processor resizes and centre-crops",
            tokenisation="llava",
        ),
        ModelPreset(
            "huatuo_qwen25vl", "FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL", None, False, None, (), "calibrate heads", "qwen2_vl"
        ),
        ModelPreset(
            "qwen25vl", "Qwen/Qwen2.5-VL-7B-Instruct", None, False, None, (), "general-domain reference; calibrate heads", "qwen2_vl"
        ),
        # the authors' current grounding code also runs these two (its Qwen backends)
        ModelPreset("lingshu", "lingshu-medical-mllm/Lingshu-7B", None, False, None, (), "medical Qwen2.5-VL; calibrate heads", "qwen2_vl"),
        ModelPreset("qwen3vl", "Qwen/Qwen3-VL-8B-Instruct", None, False, None, (), "general-domain Qwen3-VL; calibrate heads", "qwen2_vl"),
        # published only in their own codebases' layouts: `lmms-vg convert` makes the folder that pretrained= names
        ModelPreset(
            "llava_tri",
            "",
            LLAMA3_LLAVA_TEMPLATE,
            True,
            None,
            (),
            "LLaVA-Tri (LLaVA-Med++, S2 CLIP + Llama-3-8B) ships in the LLaVA layout (e.g. yunfeixie/vqa_rad_release): "
            "convert it with `lmms-vg convert <download> <folder>` and give pretrained=<folder>",
            tokenisation="llava",
        ),
        ModelPreset(
            "huatuo_bio",
            "",
            HUATUO_TEMPLATE,
            True,
            None,
            (),
            "HuatuoGPT-V-Bio (BiomedCLIP + Qwen2, trained with LLaVA-NeXT) has no public checkpoint: convert the authors' "
            "with `lmms-vg convert <checkpoint> <folder> [--vision-tower <BiomedCLIP folder>]` and give pretrained=<folder>",
            tokenisation="huatuo",
        ),
        # VILA-M3 ships in the VILA codebase's layout (llm/, vision_tower/, mm_projector/): convert it first
        ModelPreset(
            "vila_m3",
            "",
            VILA_LLAMA3_TEMPLATE,
            False,
            None,
            (),
            "VILA-M3-8B (MONAI/Llama3-VILA-M3-8B) ships in the VILA layout: convert it with "
            "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
            "vila",
            tokenisation="llava",
        ),
        ModelPreset(
            "vila_m3_13b",
            "",
            VICUNA_V1_TEMPLATE,
            False,
            None,
            (),
            "VILA-M3-13B (MONAI/Llama3-VILA-M3-13B) ships in the VILA layout: convert it with "
            "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
            "vila",
            tokenisation="llava",
        ),
        ModelPreset(
            "medrega",
            "",
            HERMES2_TEMPLATE,
            False,
            None,
            (),
            "MedRegA (Luxuriant16/medrega: InternVL-Chat-V1-2, InternViT-6B + Yi-34B) ships as remote code: convert it with "
            "`lmms-vg convert <download> <folder>` and give pretrained=<folder>",
            "internvl",
        ),
        ModelPreset(
            "lmms_vg_demo",
            DEMO_CHECKPOINT,
            HUATUO_TEMPLATE,
            True,
            "demo",
            (),
            "bundled demo model (lmms_vg/demo/train.py)",
            tokenisation="huatuo",
        ),
    )
}
GENERIC_MODEL_ID = "lmms_vg_llava"
METHODS = ("vgrefine", "pai", "adaptvis", "vicrop")  # inference-time methods a model id can run (README 'Methods')
METHOD_SUFFIXES = tuple(f"_{m}" for m in METHODS)  # any LLaVA checkpoint, pretrained= required


def resolve_checkpoint(checkpoint: str) -> str:
    """A checkpoint id or folder; ``lmms_vg:<path>`` names a folder shipped inside the package."""
    if checkpoint.startswith("lmms_vg:"):
        from importlib import resources

        return str(resources.files("lmms_vg").joinpath(*checkpoint.removeprefix("lmms_vg:").split("/")))
    return checkpoint


def class_name(model_id: str) -> str:
    """The wrapper class lmms-eval loads for a model id (``lmms_vg_models.model_ids.<name>``): its one home."""
    return "".join(part.capitalize() for part in model_id.split("_"))


def model_ids() -> list[str]:
    """Every model id lmms-vg registers: each preset, and its twin per method (``_vgrefine``, ``_pai``, ``_adaptvis``)."""
    return [mid + suffix for mid in (GENERIC_MODEL_ID, *PRESETS) for suffix in ("", *METHOD_SUFFIXES)]


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``huatuo_pai`` -> (``huatuo``, ``pai``); an id without a method suffix -> (id, None)."""
    for suffix in METHOD_SUFFIXES:
        if model_id.endswith(suffix):
            return model_id.removesuffix(suffix), suffix[1:]
    return model_id, None
