"""The lmms-eval model every lmms-vg id is: a family's adapter (:data:`lmms_vg.presets.FAMILIES`) behind lmms-eval's API.

Each model id is this class with its preset and family set (:mod:`lmms_vg_models.model_ids`).
Requests of lmms-vg's tasks carry an ``lmms_vg`` entry in their generation_kwargs: those with
``mode: grounding`` are scored for grounding, the others generate; their outputs are typed
(:mod:`lmms_vg.outputs`). Requests of lmms-eval's own tasks get plain text.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from lmms_vg import engine, files, methods, outputs, settings
from lmms_vg.grounding import GroundingRecord, GroundingRunner, GroundingSample
from lmms_vg.passes import same_grid
from lmms_vg.presets import FAMILIES, ModelPreset, resolve_checkpoint
from lmms_vg.prompts import GENERIC_PROMPT, SHORT_ANSWER
from lmms_vg.reasons import located
from lmms_vg.vgrefine import VGRefiner, config_from_args
from lmms_vg_models.loading import ModelLoadError, load_checkpoint, maps_folder

FAILURE_STREAK_LIMIT = 16  # samples failing in a row (no success between) before a run is judged broken and stopped
TEMPLATE_ALLOWANCE = 256  # tokens a chat template may add around the question, at most
AUTHORS_SAMPLING = {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 256}
GROUNDING_KEY = "lmms_vg"


def plain_text(output: str) -> str:
    """An output as lmms-eval's own tasks expect it: the answer's text (an error keeps its encoded reason, visible in their logs)."""
    value = outputs.decode(output)
    return value.text if isinstance(value, outputs.Answer) else output


def with_continuation(batch: dict, cont: torch.Tensor) -> dict:
    """An encoded one-prompt batch with ``cont`` ``[1, C]`` appended: ids, a mask of ones, and zeros in every other
    per-token input (Qwen2-VL's token types: the continuation is text)."""
    length = batch["input_ids"].shape[1]
    extended = {}
    for key, value in batch.items():
        if key == "input_ids":
            value = torch.cat([value, cont], 1)
        elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length):
            fill = torch.ones_like(cont) if key == "attention_mask" else torch.zeros_like(cont)
            value = torch.cat([value, fill.to(value.dtype)], 1)
        extended[key] = value
    return extended


def error_record(reason: str) -> str:
    """What a sample that could not run returns in place of an answer: its reason, which the task reports and counts."""
    return outputs.encode(outputs.SampleError(reason))


class VGModel(lmms):
    """One model of a family (batched, left-padded), with the attention engine installed."""

    preset: ModelPreset | None = None
    family = "llava"  # without a preset (the generic id): the family of the checkpoints it takes
    method_default: str | None = None  # the id's method: "vgrefine", "pai", "adaptvis" or None (presets.METHODS)

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
        percentile: float | None = None,
        knockout_layers=None,
        knockout_mode: str = "mask",
        reference_prompt: bool = True,
        reference_cache: int = 64,
        head_level: bool = False,
        save_maps: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fetch_image=None,
        alpha=None,
        gamma=None,
        start_layer=None,
        threshold=None,
        weight1=None,
        weight2=None,
        layer=None,
        bbox_size=None,
        high_res=None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unknown model_args {sorted(kwargs)}; see README 'Model arguments'")
        preset = self.preset
        family = FAMILIES[preset.family if preset else self.family]
        pretrained = resolve_checkpoint(pretrained or (preset.checkpoint if preset else ""))
        if not pretrained:
            raise ModelLoadError(
                f"{preset.note} (no default checkpoint)" if preset else "this model id needs pretrained=<checkpoint id or folder>"
            )
        if sampling not in ("greedy", "authors"):
            raise ValueError(
                f"sampling={sampling!r}: use 'greedy' (default) or 'authors' (temperature 0.2, repetition penalty 1.2, 256 tokens)"
            )
        # every setting is parsed and checked here, before a (possibly long) checkpoint load and before any sample
        trust_remote_code = settings.as_bool("trust_remote_code", trust_remote_code)
        self.reference_prompt = settings.as_bool("reference_prompt", reference_prompt)
        method = self.method_default
        if vgrefine is not None:  # vgrefine=on/off switches VGRefine on any id
            method = "vgrefine" if settings.as_bool("vgrefine", vgrefine) else (None if method == "vgrefine" else method)
        use_vgrefine = method == "vgrefine"
        given = {"alpha": alpha, "gamma": gamma, "start_layer": start_layer, "threshold": threshold, "weight1": weight1, "weight2": weight2}
        given = {k: v for k, v in {**given, "layer": layer, "bbox_size": bbox_size, "high_res": high_res}.items() if v is not None}
        if method in ("pai", "adaptvis", "vicrop"):
            self.method_config = methods.config_from_args(method, given)
            settings_used = dataclasses.asdict(self.method_config)
        elif given:
            raise ValueError(
                f"{', '.join(sorted(given))}: settings of the _pai / _adaptvis / _vicrop ids (README 'Methods'); "
                f"this id runs {method or 'no method'}"
            )
        else:
            self.method_config = None
            settings_used = {}
        self.method = method
        pad_to_square = None if pad_to_square is None else settings.as_bool("pad_to_square", pad_to_square)
        self.batch_size_per_gpu = settings.as_int("batch_size", batch_size, minimum=1)
        self.reference_cache = settings.as_int("reference_cache", reference_cache, minimum=0)
        self.head_level = settings.as_bool("head_level", head_level)
        self.save_maps = maps_folder(save_maps)
        pixels = {k: settings.as_int(k, v, minimum=1) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if pixels and not family.pixel_limits:
            raise ValueError(f"{', '.join(pixels)} apply to Qwen2-VL-family models only; this model's geometry is fixed by its processor")
        if fetch_image is not None and not family.pixel_limits:
            raise ValueError("fetch_image applies to Qwen2-VL-family models only (qwen_vl_utils' first resize)")
        image_options = {"fetch": settings.as_bool("fetch_image", fetch_image)} if fetch_image is not None else {}
        refine_config = (
            config_from_args(
                pretrained,
                heads or (preset.heads if preset else None),
                top_k,
                percentile,
                knockout_layers,
                knockout_mode,
                default_layers=preset.knockout_layers if preset else (),
                normalise=self.reference_prompt,
            )
            if use_vgrefine
            else None
        )
        accelerator = Accelerator()
        if device is None or device == "cuda" and not torch.cuda.is_available():
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        # pixel limits (e.g. the authors' Qwen grounding runs: max_pixels=50176) reach the image processor as its
        # from_pretrained keywords, as Qwen's model cards pass them
        model, processor = load_checkpoint(
            pretrained, family.model_types, torch_dtype, device_map or None, revision, trust_remote_code, processor_kwargs=pixels
        )
        if not device_map:
            model.to(self._device)
        engine.install(model)
        if pad_to_square is None and preset is not None:
            pad_to_square = preset.pad_to_square
        self.name = pretrained
        self.adapter = family.adapter_class()(
            model,
            processor,
            chat_template or (preset.chat_template if preset else None),
            name=pretrained,
            pad_to_square=pad_to_square,
            tokenisation=preset.tokenisation if preset else "whole",
            **image_options,
        )
        self.sampling = sampling
        self._failure_streak = 0
        self._grounding: dict[tuple, GroundingRunner] = {}
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._world_size > 1:
            logger.info(f"lmms-vg: data-parallel rank {self._rank} of {self._world_size} on {self._device}")
        # heads and layers are checked against the model here, still before any sample
        self.refiner = VGRefiner(self.adapter, refine_config, self.reference_cache) if refine_config else None
        if self.method_config is not None:
            self.method_config.check(self.adapter)
        text = getattr(model.config, "text_config", model.config)
        self.context_length = getattr(text, "max_position_embeddings", None)
        if self.refiner is not None:
            settings_used = refine_config.settings()
        # the method and its settings are part of every number it gives: each answer carries them
        self.method_record = {"name": method, "settings": settings_used} if method else {}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor; ``batch_size`` or ``device`` in ``--model_args`` win over the CLI's (which always passes its own)."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args and k != "max_batch_size"}
        return cls(**args, **extra)

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

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """The request's images, in order (at most the preset's ``max_images``, as the original chatbot caps them)."""
        visuals = [v for v in doc_to_visual(self._doc(task, split, doc_id)) or [] if v is not None]
        if not visuals:
            raise ValueError(f"{task} doc {doc_id}: no image; lmms-vg models need at least one image per sample")
        limit = self.preset.max_images if self.preset else None
        return visuals[:limit] if limit else visuals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="lmms-vg")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            ours = GROUNDING_KEY in gen_kwargs  # an lmms-vg task: typed outputs; lmms-eval's own tasks get plain text
            vg = gen_kwargs.pop(GROUNDING_KEY, None) or {}
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, out in zip(chunk, self._run_isolated([requests[i].args for i in chunk], gen_kwargs, vg)):
                    results[i] = out if ours else plain_text(out)
                pbar.update(len(chunk))
        pbar.close()
        return results

    def _run_isolated(self, args_list, gen_kwargs: dict, vg: dict) -> list[str]:
        """One batch; if it fails, each sample alone, so that a bad sample costs itself only (its error record names why).

        Samples failing one after another without a success in between look like a broken setup rather
        than bad samples: after ``FAILURE_STREAK_LIMIT`` of them the run stops with the last error.
        """
        try:
            results = self._ground(args_list, vg) if vg.get("mode") == "grounding" else self._generate(args_list, gen_kwargs, vg)
        except Exception as err:
            if len(args_list) > 1:
                logger.warning(f"lmms-vg: a batch of {len(args_list)} failed ({type(err).__name__}: {err}); running its samples one by one")
                return [out for a in args_list for out in self._run_isolated([a], gen_kwargs, vg)]
            task, doc_id = args_list[0][4], args_list[0][3]
            self._failure_streak += 1
            if self._failure_streak >= FAILURE_STREAK_LIMIT:
                raise RuntimeError(
                    f"lmms-vg: {self._failure_streak} samples in a row failed, the last ({task} doc {doc_id}) with "
                    f"{type(err).__name__}: {err}. This looks like a setup problem, not bad samples; the run stops."
                ) from err
            logger.error(f"lmms-vg: {task} doc {doc_id} failed: {type(err).__name__}: {err}")
            return [error_record(located(f"sample failed: {type(err).__name__}: {err}", f"{task} doc {doc_id}"))]
        self._failure_streak = 0
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
        """Answers for a batch; a sample whose images cannot be read gets an error record and the rest go on.

        Under VGRefine, an item with several images (MMMU) is answered without the knockout, which
        is defined for one image; its log says so (``vgrefine``).
        """
        kwargs, until = self._generation_kwargs(dict(gen_kwargs))
        visuals, keep, errors = self._load_visuals(args_list, kwargs.get("max_new_tokens", 1))
        results: list[str | None] = [error_record(errors[j]) if j in errors else None for j in range(len(args_list))]
        texts = [args_list[j][0] for j in keep]
        refine = [n for n, v in enumerate(visuals) if len(v) == 1] if self.refiner is not None else []
        plain = sorted(set(range(len(keep))) - set(refine))
        tokens: list = [None] * len(keep)
        extras: list[dict] = [{} for _ in keep]
        used = (
            (vg.get("reference_prompt") or self.refiner.config.reference_prompt)
            if self.refiner and self.refiner.config.reference_prompt
            else None
        )
        for group in same_grid(self.adapter, [visuals[n][0] for n in refine]):
            members = [refine[g] for g in group]
            outcome = self.refiner.generate(
                [visuals[n][0] for n in members],
                [texts[n] for n in members],
                image_keys=[self._image_key(args_list[keep[n]], vg) for n in members],
                reference_prompt=vg.get("reference_prompt"),
                **kwargs,
            )
            for n, row, frac in zip(members, outcome.tokens, outcome.knocked_fraction):
                tokens[n] = row
                extras[n] = {
                    "knocked_fraction": round(frac, 6),
                    "knockout_layers": tuple(self.refiner.config.knockout_layers),
                    "method": {**self.method_record, "settings": {**self.method_record["settings"], "reference_prompt": used}},
                }
        if plain and self.method_config is not None:  # PAI / AdaptVis: every item; ViCrop: one image (it crops it)
            chosen = [n for n in plain if self.method != "vicrop" or len(visuals[n]) == 1]
            run = {"pai": methods.pai_generate, "adaptvis": methods.adaptvis_generate, "vicrop": methods.vicrop_generate}[self.method]
            if chosen:
                images = [visuals[n] if self.method != "vicrop" else visuals[n][0] for n in chosen]
                extra = {}
                if self.method == "vicrop":  # its attention passes ask the short question (run.py), where the task names it
                    extra["attention_texts"] = [self._short_question(args_list[keep[n]], vg, texts[n]) for n in chosen]
                outcome = run(self.adapter, images, [texts[n] for n in chosen], self.method_config, **extra, **kwargs)
                for n, row, details in zip(chosen, outcome.tokens, outcome.details):
                    tokens[n], extras[n] = row, {"method": {**self.method_record, **details}}
            plain = sorted(set(plain) - set(chosen))
            for n in plain:
                extras[n] = {"method": {**self.method_record, "applied": f"no: {len(visuals[n])} images (ViCrop crops one)"}}
        if plain:
            batch = self.adapter.encode([visuals[n] for n in plain], [texts[n] for n in plain])
            with torch.no_grad():
                rows = self.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
            for n, row in zip(plain, rows):
                tokens[n] = row
                if self.refiner is not None:
                    extras[n] = {"vgrefine": f"not applied: {len(visuals[n])} images (the knockout is defined for one)"}
        for n, j in enumerate(keep):
            if files.orientations(visuals[n]):
                extras[n]["exif_orientation"] = files.orientations(visuals[n])
            text = self.tokenizer.decode(tokens[n], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            text = text.strip()
            results[j] = outputs.encode(outputs.Answer(text, **extras[n]))
        return results

    def _short_question(self, args, vg: dict, prompt: str) -> str:
        """ViCrop's attention prompt: the doc's bare question (the field the task names as ``question_key``) + the short-answer
        instruction, as its run.py asks; the task's prompt where the task names no field (lmms-eval's own tasks)."""
        field = vg.get("question_key")
        doc = self._doc(args[4], args[5], args[3]) if field else {}
        question = doc.get(field) if field else None
        return f"{str(question).strip()}{SHORT_ANSWER}" if question else prompt

    def _image_key(self, args, vg: dict) -> str:
        """``task/image``: the key of the per-image reference cache (the doc field the task names as ``image_key``, else the doc)."""
        field = vg.get("image_key")
        doc = self._doc(args[4], args[5], args[3])
        return f"{args[4]}/{doc.get(field) if field and doc.get(field) else args[3]}"

    @staticmethod
    def _grounding_fields(vg: dict, task: str) -> tuple[str, str, str | None]:
        """The doc fields a grounding task names in its YAML: (boxes, their format, why a row is skipped)."""
        if not vg.get("boxes"):
            raise ValueError(f"task {task}: a grounding task names its boxes' doc field in generation_kwargs.lmms_vg.boxes")
        return vg["boxes"], vg.get("box_format", "xyxy"), vg.get("skip_reason")

    def _load_visuals(self, args_list, new_tokens: int = 1) -> tuple[list[list], list[int], dict[int, str]]:
        """Each request's images: (image lists, indices of the requests that can run, index -> why the others cannot).

        A request whose prompt, with its images and ``new_tokens``, exceeds the model's context is left out here,
        before any batch runs (a megabyte question would otherwise stall the batch it is in).
        """
        visuals, keep, errors = [], [], {}
        for j, a in enumerate(args_list):
            try:
                images = self._visuals(a[2], a[4], a[5], a[3])
                too_long = self._too_long(a[0], images, new_tokens)
                if too_long:
                    raise ValueError(too_long)
                visuals.append(images)
                keep.append(j)
            except (OSError, ValueError) as err:
                logger.warning(f"lmms-vg: {a[4]} doc {a[3]} skipped: {err}")
                errors[j] = located(str(err), f"{a[4]} doc {a[3]}")
        return visuals, keep, errors

    def _too_long(self, text: str, images: list, new_tokens: int) -> str | None:
        """Why a prompt cannot run in the model's context (None where it fits); tokenised only when its length could matter."""
        if not self.context_length:
            return None
        image_tokens = sum(self.adapter.image_tokens(image) for image in images)
        budget = self.context_length - image_tokens - new_tokens
        if len(text) + TEMPLATE_ALLOWANCE <= budget:  # a token covers at least one character
            return None
        prompt = sum(map(len, self.adapter.chunks(text, len(images))))
        if prompt > budget:
            return (
                f"prompt too long: {prompt} text tokens + {image_tokens} image tokens + {new_tokens} new tokens exceed "
                f"the model's context of {self.context_length}"
            )
        return None

    def _ground(self, args_list, vg: dict) -> list[str]:
        reference = vg.get("reference_prompt", GENERIC_PROMPT + SHORT_ANSWER) if self.reference_prompt else None
        head_level = self.head_level or settings.as_bool("generation_kwargs.lmms_vg.head_level", vg.get("head_level", False))
        key = (reference, head_level)  # a runner per setting it depends on (the model-level ones are fixed for the run)
        runner = self._grounding.get(key)
        if runner is None:
            runner = self._grounding[key] = GroundingRunner(
                self.adapter,
                reference,
                self.reference_cache,
                head_level=head_level,
                save_maps=self.save_maps,
                knockout=self.refiner.config if self.refiner else None,  # a _vgrefine model measures with its knockout in place
                # PAI and AdaptVis change the attention itself; ViCrop changes the input, its grounding is the model's own
                steering=methods.steering(self.method, self.method_config, self.adapter) if self.method in ("pai", "adaptvis") else None,
            )
        visuals, todo, errors = self._load_visuals(args_list)
        records = [GroundingRecord(skipped=errors[j]) if j in errors else None for j in range(len(args_list))]
        samples = []
        for j, images in zip(todo, visuals):
            a = args_list[j]
            doc = self._doc(a[4], a[5], a[3])
            boxes, box_format, skip_reason = self._grounding_fields(vg, a[4])
            if skip_reason and doc.get(skip_reason):  # the data says why this row cannot be scored (file and line)
                records[j] = GroundingRecord(skipped=doc[skip_reason])
                continue
            if len(images) != 1:
                records[j] = GroundingRecord(skipped=f"several images: grounding maps one image per sample, this one has {len(images)}")
                continue
            samples.append(
                (
                    j,
                    GroundingSample(
                        image=images[0],
                        question=a[0],
                        boxes=doc[boxes],
                        box_format=box_format,
                        image_key=self._image_key(a, vg),
                        sample_id=f"{a[4]}_{a[3]}",
                    ),
                )
            )
        for group in same_grid(self.adapter, [s.image for _, s in samples]):
            for n, record in zip(group, runner.score([samples[n][1] for n in group])):
                records[samples[n][0]] = record
        return [outputs.encode(r) for r in records]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each continuation's summed log-probability after its prompt and images, and whether greedy decoding gives it."""
        results = []
        for context, target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            batch = self.adapter.encode([self._visuals(doc_to_visual, task, split, doc_id)], [context])
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
            with torch.no_grad():  # every input the family's encoding gives (Qwen2-VL: its grid and token types too)
                logits = self.model(**with_continuation(batch, cont)).logits
            logprobs = torch.log_softmax(logits[0, batch["input_ids"].shape[1] - 1 : -1].float(), -1)
            picked = logprobs.gather(1, cont[0][:, None]).squeeze(1)
            results.append((float(picked.sum()), bool((logprobs.argmax(-1) == cont[0]).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("lmms-vg models answer single-turn tasks")
