"""lmms-eval model for every LlavaForConditionalGeneration checkpoint, with grounding capture and VGRefine.

Model ids (one class each, made from the presets in :mod:`lmms_vg.presets`): ``huatuo``,
``huatuo_34b``, ``llava_med``, ``llava15``, each with a ``_vgrefine`` twin, and ``lmms_vg_llava``
for any other checkpoint (``pretrained=`` required).

Requests whose task sets ``lmms_vg: {mode: grounding, ...}`` in its generation_kwargs are
scored for grounding (the result string is a JSON :class:`GroundingRecord`); all others generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from lmms_vg import engine
from lmms_vg.adapters import LlavaAdapter, Qwen2VLAdapter
from lmms_vg.grounding import GENERIC_PROMPT, SHORT_ANSWER, GroundingRecord, GroundingRunner, GroundingSample
from lmms_vg.presets import GENERIC_MODEL_ID, PRESETS, ModelPreset, class_name, model_ids, resolve_checkpoint
from lmms_vg.vgrefine import VGRefineConfig, VGRefiner, load_heads

AUTHORS_SAMPLING = {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 256}
GROUNDING_KEY = "lmms_vg"


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says what to do."""


def parse_layers(value) -> tuple[int, ...]:
    """``16``, ``"14;15;16"`` or ``"14 15"`` -> (14, 15, 16). lmms-eval's model_args split on commas."""
    if value is None or value == "":
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in str(value).replace(";", " ").replace("/", " ").split())


def load_checkpoint(pretrained: str, model_types: dict[str, str], dtype, device_map, revision: str, trust_remote_code: bool):
    """Load a transformers-native checkpoint of one of ``model_types`` (model_type -> class name) and its processor.

    Errors say what to do: a folder without config.json, an architecture this model id does not take,
    a checkpoint that needs its own code while trust_remote_code is off.
    """
    import transformers
    from transformers import AutoConfig

    local = Path(pretrained)
    if (pretrained.startswith((".", "/", "~")) or local.exists()) and not (local.expanduser() / "config.json").exists():
        raise ModelLoadError(
            f"checkpoint path '{pretrained}' has no config.json; give a transformers-native folder or convert one (README 'Converting')"
        )
    try:
        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{pretrained} needs its own code: pass trust_remote_code=true in --model_args if you trust it") from err
        raise ModelLoadError(f"{pretrained}: {err}") from err
    except OSError as err:
        raise ModelLoadError(
            f"cannot load '{pretrained}' ({err}); check the id or path, or download it first (offline: HF_HUB_OFFLINE=1 needs a local copy)"
        ) from err
    if config.model_type not in model_types:
        raise ModelLoadError(
            f"{pretrained} is a '{config.model_type}' checkpoint, not {' or '.join(model_types.values())}. "
            "Original LLaVA-format checkpoints convert with `lmms-vg convert`; other architectures: README 'Models'."
        )
    cls = getattr(transformers, model_types[config.model_type])
    model = cls.from_pretrained(
        pretrained, revision=revision, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
    ).eval()
    return model, load_processor(pretrained, revision, trust_remote_code)


def load_processor(pretrained: str, revision: str, trust_remote_code: bool):
    """The checkpoint's processor; where it cannot be built (Qwen2-VL's video part needs torchvision), its tokenizer and image processor."""
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, OSError) as err:
        logger.info(f"lmms-vg: {pretrained}: full processor unavailable ({err}); using its tokenizer and image processor")
        return SimpleNamespace(
            tokenizer=AutoTokenizer.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code),
            image_processor=AutoImageProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code),
        )


class LlavaVG(lmms):
    """Shared LLaVA-family wrapper (batched, left-padded), with the attention engine installed."""

    preset: ModelPreset | None = None
    vgrefine_default = False
    adapter_class = LlavaAdapter  # a new prompt format or geometry: subclass LlavaAdapter and set this
    model_types: ClassVar[dict[str, str]] = {"llava": "LlavaForConditionalGeneration"}  # config.model_type -> transformers class

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str = "main",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        device_map: str | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        pad_to_square: bool | None = None,
        sampling: str = "greedy",
        vgrefine: bool | None = None,
        heads: str | None = None,
        top_k: int | None = None,
        percentile: float = 50.0,
        knockout_layers=None,
        knockout_mode: str = "mask",
        reference_prompt: bool = True,
        reference_cache: int = 64,
        head_level: bool = False,
        save_maps: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown model_args {sorted(kwargs)}; see README 'Model arguments'")
        preset = self.preset
        pretrained = resolve_checkpoint(pretrained or (preset.checkpoint if preset else ""))
        if not pretrained:
            raise ModelLoadError("lmms_vg_llava needs pretrained=<checkpoint id or folder>")
        if sampling not in ("greedy", "authors"):
            raise ValueError(
                f"sampling={sampling!r}: use 'greedy' (default) or 'authors' (temperature 0.2, repetition penalty 1.2, 256 tokens)"
            )
        self.reference_prompt = bool(reference_prompt)
        use_vgrefine = self.vgrefine_default if vgrefine is None else bool(vgrefine)
        # settings that need no model fail here, before a (possibly long) checkpoint load
        refine_config = self._refine_config(pretrained, heads, top_k, percentile, knockout_layers, knockout_mode) if use_vgrefine else None
        accelerator = Accelerator()
        if device is None or device == "cuda" and not torch.cuda.is_available():
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model, processor = load_checkpoint(pretrained, self.model_types, torch_dtype, device_map or None, revision, bool(trust_remote_code))
        if not device_map:
            model.to(self._device)
        engine.install(model)
        if pad_to_square is None and preset is not None:
            pad_to_square = preset.pad_to_square
        if pad_to_square is not None and hasattr(processor.image_processor, "do_pad"):
            processor.image_processor.do_pad = bool(pad_to_square)
        self.name = pretrained
        self.adapter = self.adapter_class(model, processor, chat_template or (preset.chat_template if preset else None), name=pretrained)
        self.batch_size_per_gpu = int(batch_size)
        self.sampling = sampling
        self.reference_cache = int(reference_cache)
        self.head_level = bool(head_level)
        self.save_maps = save_maps
        self._grounding: dict[str | None, GroundingRunner] = {}
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._world_size > 1:
            logger.info(f"lmms-vg: data-parallel rank {self._rank} of {self._world_size} on {self._device}")
        # heads and layers are checked against the model here, still before any sample
        self.refiner = VGRefiner(self.adapter, refine_config, self.reference_cache) if refine_config else None

    def _refine_config(self, name, heads, top_k, percentile, knockout_layers, mode) -> VGRefineConfig:
        heads = heads or (self.preset.heads if self.preset else None)
        if not heads:
            raise ValueError(
                f"{name}: VGRefine needs heads=<preset name or calibration JSON>; none is published for this model (README 'VGRefine')"
            )
        preset = load_heads(str(heads))
        layers = parse_layers(knockout_layers) or preset.knockout_layers or (self.preset.knockout_layers if self.preset else ())
        return VGRefineConfig(
            heads=preset.heads,
            knockout_layers=layers,
            top_k=int(top_k) if top_k is not None else min(20, len(preset.heads)),  # paper: K=20
            percentile=float(percentile),
            mode=str(mode),
            reference_prompt=(GENERIC_PROMPT + SHORT_ANSWER) if self.reference_prompt else None,
        )

    # lmms-eval plumbing
    @property
    def model(self):
        return self.adapter.model

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visual(self, doc_to_visual, task, split, doc_id):
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if not visuals:
            raise ValueError(f"{task} doc {doc_id}: no image; lmms-vg models need one image per sample")
        return visuals[0]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="lmms-vg")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            vg = gen_kwargs.pop(GROUNDING_KEY, None)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                try:
                    if vg and vg.get("mode") == "grounding":
                        outputs = self._ground([requests[i].args for i in chunk], vg)
                    else:
                        outputs = self._generate([requests[i].args for i in chunk], gen_kwargs, vg or {})
                except (OSError, ValueError) as err:  # a bad sample: reported, counted by the task, the run goes on
                    logger.error(f"lmms-vg: batch of {len(chunk)} failed: {err}")
                    outputs = [json.dumps({"lmms_vg_error": str(err)})] * len(chunk)
                for i, out in zip(chunk, outputs):
                    results[i] = out
                pbar.update(len(chunk))
        pbar.close()
        return results

    def _generation_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if self.sampling == "authors":
            kwargs = dict(AUTHORS_SAMPLING)
        else:
            kwargs = {"do_sample": False, "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128))}
        kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        return kwargs, until

    def _generate(self, args_list, gen_kwargs: dict, vg: dict) -> list[str]:
        """Answers for a batch; a sample whose image cannot be read gets an error record and the rest go on."""
        kwargs, until = self._generation_kwargs(dict(gen_kwargs))
        images, keep, errors = self._load_images(args_list)
        outputs: list[str | None] = [json.dumps({"lmms_vg_error": errors[j]}) if j in errors else None for j in range(len(args_list))]
        if not keep:
            return outputs
        texts = [args_list[j][0] for j in keep]
        fractions = None
        if self.refiner is not None:
            tokens, fractions = [None] * len(keep), [0.0] * len(keep)
            for group in self._same_grid(images):  # the engine takes one image-token count per batch
                keys = [self._image_key(args_list[keep[n]]) for n in group]
                outcome = self.refiner.generate(
                    [images[n] for n in group],
                    [texts[n] for n in group],
                    image_keys=keys,
                    reference_prompt=vg.get("reference_prompt"),
                    **kwargs,
                )
                for n, row, frac in zip(group, outcome.tokens, outcome.knocked_fraction):
                    tokens[n], fractions[n] = row, frac
        else:
            batch = self.adapter.encode(images, texts)
            with torch.no_grad():
                tokens = self.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
        for n, (j, row) in enumerate(zip(keep, tokens)):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            text = text.strip()
            if fractions is not None:  # per-sample log fields (issue: fraction knocked out, layers used)
                text = json.dumps(
                    {"text": text, "knocked_fraction": round(fractions[n], 6), "knockout_layers": list(self.refiner.config.knockout_layers)}
                )
            outputs[j] = text
        return outputs

    def _image_key(self, args) -> str:
        """``task/image``: the key of the per-image reference cache."""
        doc = self._doc(args[4], args[5], args[3])
        return f"{args[4]}/{doc.get('vg_image_key') or doc.get('image_id') or args[3]}"

    def _load_images(self, args_list) -> tuple[list, list[int], dict[int, str]]:
        """Each request's image: (images, indices of the requests that have one, index -> why the others have none)."""
        images, keep, errors = [], [], {}
        for j, a in enumerate(args_list):
            try:
                images.append(self._visual(a[2], a[4], a[5], a[3]))
                keep.append(j)
            except (OSError, ValueError) as err:
                logger.warning(f"lmms-vg: {a[4]} doc {a[3]} skipped: {err}")
                errors[j] = str(err)
        return images, keep, errors

    def _ground(self, args_list, vg: dict) -> list[str]:
        reference = vg.get("reference_prompt", GENERIC_PROMPT + SHORT_ANSWER) if self.reference_prompt else None
        runner = self._grounding.get(reference)
        if runner is None:
            runner = self._grounding[reference] = GroundingRunner(
                self.adapter,
                reference,
                self.reference_cache,
                head_level=self.head_level or bool(vg.get("head_level")),
                save_maps=self.save_maps,
                refiner=self.refiner,  # a _vgrefine model measures its attention with the knockout in place
            )
        images, todo, errors = self._load_images(args_list)
        records = [GroundingRecord(skipped=f"image unreadable: {errors[j]}") if j in errors else None for j in range(len(args_list))]
        samples = [
            GroundingSample(
                image=image,
                question=args_list[j][0],
                boxes=self._doc(args_list[j][4], args_list[j][5], args_list[j][3])["vg_boxes"],
                box_format="xyxy",
                image_key=self._image_key(args_list[j]),
                sample_id=f"{args_list[j][4]}_{args_list[j][3]}",
            )
            for j, image in zip(todo, images)
        ]
        for group in self._same_grid([s.image for s in samples]):
            for n, record in zip(group, runner.score([samples[n] for n in group])):
                records[todo[n]] = record
        return [r.to_json() for r in records]

    def _same_grid(self, images) -> list[list[int]]:
        """Indices of the images grouped by token grid (one group for LLaVA's fixed grid)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for n, image in enumerate(images):
            t = self.adapter.transform(image)
            groups.setdefault((t.rows, t.cols), []).append(n)
        return list(groups.values())

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            image = self._visual(doc_to_visual, task, split, doc_id)
            batch = self.adapter.encode([image], [context])
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            ids = torch.cat([batch["input_ids"], cont], 1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(cont)], 1)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
            logprobs = torch.log_softmax(logits[0, batch["input_ids"].shape[1] - 1 : -1].float(), -1)
            picked = logprobs.gather(1, cont[0][:, None]).squeeze(1)
            results.append((float(picked.sum()), bool((logprobs.argmax(-1) == cont[0]).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lmms-vg models answer single-turn tasks")


class Qwen2VLVG(LlavaVG):
    """Qwen2-VL / Qwen2.5-VL checkpoints (e.g. HuatuoGPT-Vision-7B-Qwen2.5VL): the same options, full-prompt passes."""

    adapter_class = Qwen2VLAdapter
    model_types: ClassVar[dict[str, str]] = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    }


FAMILIES = {"llava": LlavaVG, "qwen2_vl": Qwen2VLVG}


def _make(model_id: str) -> type[LlavaVG]:
    """The class for a model id: its preset's family, the preset, and VGRefine on for ``*_vgrefine``."""
    preset = PRESETS.get(model_id.removesuffix("_vgrefine"))
    attrs = {"preset": preset, "vgrefine_default": model_id.endswith("_vgrefine"), "__module__": __name__}
    return type(class_name(model_id), (FAMILIES[preset.family if preset else "llava"],), attrs)


MODEL_CLASSES: dict[str, type[LlavaVG]] = {mid: LlavaVG if mid == GENERIC_MODEL_ID else _make(mid) for mid in model_ids()}
globals().update({cls.__name__: cls for cls in MODEL_CLASSES.values()})


def register_preset(preset: ModelPreset) -> list:
    """Add a preset at run time (e.g. from your own package): its two classes, and manifests for lmms-eval.

    Editing ``lmms_vg/presets.py`` does the same for every run; this is for code that cannot.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    PRESETS[preset.model_id] = preset
    manifests = []
    for mid in (preset.model_id, f"{preset.model_id}_vgrefine"):
        cls = MODEL_CLASSES[mid] = _make(mid)
        globals()[cls.__name__] = cls
        manifests.append(ModelManifest(model_id=mid, simple_class_path=f"{__name__}.{cls.__name__}"))
    return manifests
