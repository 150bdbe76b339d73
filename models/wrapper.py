"""The lmms-eval model every lmms-vg id is: a family's adapter and, where the id names one, a method, behind lmms-eval's API.

Each model id is this class with its preset and method set (:mod:`lmms_vg_models.model_ids`). It
knows lmms-eval (requests, batches, ranks) and nothing of families or methods beyond their
interfaces: the family's adapter encodes and takes its own options (:class:`lmms_vg.adapters.Adapter`),
the method answers and says what it does to grounding (:class:`lmms_vg.methods.Method`).

Requests of lmms-vg's tasks carry a :class:`lmms_vg.contract.TaskRequest` in their generation_kwargs:
grounding requests get grounding records, the others answers whose text is what lmms-eval logs (the
rest of the answer waits in :data:`lmms_vg.outputs.LEDGER` for the task). Requests of lmms-eval's
own tasks get plain text.
"""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from lmms_vg import engine, files, outputs, presets, settings
from lmms_vg.contract import KEY, TaskRequest
from lmms_vg.grounding import GroundingRunner, GroundingSample
from lmms_vg.methods import METHODS, Asked
from lmms_vg.outputs import GroundingRecord, RunRecord
from lmms_vg.prompts import GENERIC_PROMPT, SHORT_ANSWER
from lmms_vg.reasons import located
from lmms_vg_models.loading import ModelLoadError, load_checkpoint, maps_folder

FAILURE_STREAK_LIMIT = 16  # samples failing in a row (no success between) before a run is judged broken and stopped
TEMPLATE_ALLOWANCE = 256  # tokens a chat template may add around the question, at most
AUTHORS_SAMPLING = {"do_sample": True, "temperature": 0.2, "repetition_penalty": 1.2, "max_new_tokens": 256}


def plain_text(output: str) -> str:
    """An output as lmms-eval's own tasks expect it: the answer's text (an error keeps its encoded reason, visible in their logs)."""
    value = outputs.decode(output)
    return value.text if isinstance(value, outputs.Answer) else output


def error_record(reason: str) -> str:
    """What a sample that could not run returns in place of an answer: its reason, which the task reports and counts."""
    return outputs.encode(outputs.SampleError(reason))


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


class VGModel(lmms):
    """One model of a family (batched, left-padded), with the attention engine installed and, for a method's id, the method."""

    preset: presets.ModelPreset | None = None
    family = "llava"  # without a preset (the generic id): the family of the checkpoints it takes
    method_default: str | None = None  # the id's method (presets.METHODS) or None

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
        reference_prompt: bool = True,
        reference_cache: int = 64,
        head_level: bool = False,
        save_maps: str | None = None,
        **options,
    ) -> None:
        """``options``: the family's (e.g. Qwen's ``max_pixels``) and the method's (e.g. PAI's ``alpha``), each checked by its owner."""
        super().__init__()
        preset = self.preset
        family = presets.family_of(preset.family if preset else self.family)
        pretrained = presets.resolve_checkpoint(pretrained or (preset.checkpoint if preset else ""))
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
        processor_options, adapter_options = family.adapter.take_options(options)
        method_name = self._method_name(vgrefine)
        method_class, method_settings = self._method_settings(method_name, options, pretrained)
        pad_to_square = None if pad_to_square is None else settings.as_bool("pad_to_square", pad_to_square)
        self.batch_size_per_gpu = settings.as_int("batch_size", batch_size, minimum=1)
        self.reference_cache = settings.as_int("reference_cache", reference_cache, minimum=0)
        self.head_level = settings.as_bool("head_level", head_level)
        self.save_maps = maps_folder(save_maps)
        chat_template = presets.template_text(chat_template)
        self._place(device)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model, processor = load_checkpoint(
            pretrained, family.model_types, torch_dtype, device_map or None, revision, trust_remote_code, processor_kwargs=processor_options
        )
        if not device_map:
            model.to(self._device)
        engine.install(model)
        self.name = pretrained
        self.adapter = family.adapter(
            model,
            processor,
            chat_template or (preset.chat_template if preset else None),
            name=pretrained,
            pad_to_square=preset.pad_to_square if pad_to_square is None and preset is not None else pad_to_square,
            tokenisation=preset.tokenisation if preset else "whole",
            **adapter_options,
        )
        self.sampling = sampling
        self._failure_streak = 0
        self._grounding: dict[tuple, GroundingRunner] = {}
        # the method's settings are checked against the model here, still before any sample
        self.method = method_class(self.adapter, method_settings, self.reference_cache) if method_class else None
        text = getattr(model.config, "text_config", model.config)
        self.context_length = getattr(text, "max_position_embeddings", None)
        # what made every number this model gives: each answer and record carries it
        model_id = preset.model_id if preset else presets.GENERIC_MODEL_ID
        own = preset is not None and pretrained == presets.resolve_checkpoint(preset.checkpoint)
        used = self.method.record() if self.method else {}
        layers = tuple(preset.knockout_layers) if preset else ()
        self.run_record = RunRecord(model_id, pretrained, method_name, used, own, layers, str(self.save_maps) if self.save_maps else None)

    def _method_name(self, vgrefine) -> str | None:
        """The id's method; ``vgrefine=on/off`` switches VGRefine on any id."""
        method = self.method_default
        if vgrefine is not None:
            method = "vgrefine" if settings.as_bool("vgrefine", vgrefine) else (None if method == "vgrefine" else method)
        return method

    def _method_settings(self, method: str | None, options: dict, pretrained: str) -> tuple[type | None, object]:
        """The method's class and its settings from the options left after the family's (it names what it does not take)."""
        method_class = METHODS.get(method) if method else None
        if not method_class:
            if options:
                raise misplaced_options(type(self).__name__, options, method)
            return None, None
        preset = self.preset
        defaults = {
            "model": pretrained,
            "heads": preset.heads if preset else None,
            "knockout_layers": preset.knockout_layers if preset else (),
            "normalise": self.reference_prompt,
        }
        return method_class, method_class.settings_from_args(options, defaults)

    def _place(self, device: str | None) -> None:
        """The device (this process's GPU under data parallel, else the CPU) and the data-parallel rank."""
        accelerator = Accelerator()
        if device is None or device == "cuda" and not torch.cuda.is_available():
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._world_size > 1:
            logger.info(f"lmms-vg: data-parallel rank {self._rank} of {self._world_size} on {self._device}")

    @property
    def method_config(self):
        """The method's settings (None without a method)."""
        return self.method.settings if self.method else None

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
            ours = KEY in gen_kwargs  # an lmms-vg task: typed outputs; lmms-eval's own tasks get plain text
            task = requests[indices[0]].args[4]
            try:
                asked = TaskRequest.parse(gen_kwargs.pop(KEY, None), task)
            except (TypeError, ValueError) as err:  # the task's own setting: each of its samples fails with the reason
                for i in indices:
                    results[i] = error_record(located(f"task setting: {err}", task))
                pbar.update(len(indices))
                continue
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, out in zip(chunk, self._run_isolated([requests[i].args for i in chunk], gen_kwargs, asked)):
                    results[i] = out if ours else plain_text(out)
                pbar.update(len(chunk))
        pbar.close()
        return results

    def _run_isolated(self, args_list, gen_kwargs: dict, asked: TaskRequest) -> list[str]:
        """One batch; if it fails, each sample alone, so that a bad sample costs itself only (its error record names why).

        Samples failing one after another without a success in between look like a broken setup rather
        than bad samples: after ``FAILURE_STREAK_LIMIT`` of them the run stops with the last error.
        """
        try:
            results = self._ground(args_list, asked) if asked.mode == "grounding" else self._generate(args_list, gen_kwargs, asked)
        except Exception as err:
            if len(args_list) > 1:
                logger.warning(f"lmms-vg: a batch of {len(args_list)} failed ({type(err).__name__}: {err}); running its samples one by one")
                return [out for a in args_list for out in self._run_isolated([a], gen_kwargs, asked)]
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

    def _generate(self, args_list, gen_kwargs: dict, asked: TaskRequest) -> list[str]:
        """Answers for a batch; a sample whose images cannot be read gets an error record and the rest go on.

        The method answers the items it is defined for (a one-image method: the items with one image);
        the others are answered plainly, and their log says why.
        """
        kwargs, until = self._generation_kwargs(dict(gen_kwargs))
        visuals, keep, errors = self._load_visuals(args_list, kwargs.get("max_new_tokens", 1))
        results: list[str | None] = [error_record(errors[j]) if j in errors else None for j in range(len(args_list))]
        texts = [args_list[j][0] for j in keep]
        method = self.method
        chosen = [n for n, v in enumerate(visuals) if method is not None and (not method.one_image or len(v) == 1)]
        plain = [n for n in range(len(keep)) if n not in chosen]
        tokens: list = [None] * len(keep)
        fields: list[dict] = [{} for _ in keep]
        if chosen:
            outcome = method.answer(
                Asked(
                    images=[visuals[n] for n in chosen],
                    texts=[texts[n] for n in chosen],
                    image_keys=[self._image_key(args_list[keep[n]], asked) for n in chosen],
                    short_questions=[self._short_question(args_list[keep[n]], asked, texts[n]) for n in chosen],
                    reference_prompt=asked.reference_prompt,
                ),
                **kwargs,
            )
            for i, n in enumerate(chosen):
                tokens[n] = outcome.tokens[i]
                fields[n] = {
                    **(outcome.answer_fields[i] if outcome.answer_fields else {}),
                    "method": {"name": method.name, **outcome.details[i]},
                }
        if plain:
            batch = self.adapter.encode([visuals[n] for n in plain], [texts[n] for n in plain])
            with torch.no_grad():
                rows = self.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
            for n, row in zip(plain, rows):
                tokens[n] = row
                fields[n] = method.not_applied(len(visuals[n])) if method is not None else {}
        for n, j in enumerate(keep):
            text = self.tokenizer.decode(tokens[n], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            answer = outputs.Answer(
                text.strip(), exif_orientation=files.orientations(visuals[n]), run=self.run_record.as_dict(), **fields[n]
            )
            results[j] = outputs.LEDGER.hand_over(self._doc(*self._where(args_list[j])), answer)
        return results

    @staticmethod
    def _where(args) -> tuple:
        return args[4], args[5], args[3]

    def _short_question(self, args, asked: TaskRequest, prompt: str) -> str:
        """ViCrop's attention prompt: the doc's bare question (the field the task names as ``question_key``) + the short-answer
        instruction, as its run.py asks; the task's prompt where the task names no field (lmms-eval's own tasks)."""
        question = self._doc(*self._where(args)).get(asked.question_key) if asked.question_key else None
        return f"{str(question).strip()}{SHORT_ANSWER}" if question else prompt

    def _image_key(self, args, asked: TaskRequest) -> str:
        """``task/image``: the key of the per-image reference cache (the doc field the task names as ``image_key``, else the doc)."""
        doc = self._doc(*self._where(args))
        field = asked.image_key
        return f"{args[4]}/{doc.get(field) if field and doc.get(field) else args[3]}"

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

    def _ground(self, args_list, asked: TaskRequest) -> list[str]:
        reference = (asked.reference_prompt or GENERIC_PROMPT + SHORT_ANSWER) if self.reference_prompt else None
        head_level = self.head_level or asked.head_level
        key = (reference, head_level)  # a runner per setting it depends on (the model-level ones are fixed for the run)
        runner = self._grounding.get(key)
        if runner is None:
            plan = self.method.grounding() if self.method else None
            runner = self._grounding[key] = GroundingRunner(
                self.adapter,
                reference,
                self.reference_cache,
                head_level=head_level,
                save_maps=self.save_maps,
                knockout=plan.knockout if plan else None,  # VGRefine measures with its knockout in place
                steering=plan.steering if plan else None,  # PAI and AdaptVis change the attention itself
            )
        visuals, todo, errors = self._load_visuals(args_list)
        records = [GroundingRecord(skipped=errors[j]) if j in errors else None for j in range(len(args_list))]
        samples = []
        for j, images in zip(todo, visuals):
            a = args_list[j]
            doc = self._doc(*self._where(a))
            if asked.skip_reason and doc.get(asked.skip_reason):  # the data says why this row cannot be scored (file and line)
                records[j] = GroundingRecord(skipped=doc[asked.skip_reason])
                continue
            if len(images) != 1:
                records[j] = GroundingRecord(skipped=f"several images: grounding maps one image per sample, this one has {len(images)}")
                continue
            sample = GroundingSample(images[0], a[0], doc[asked.boxes], asked.box_format, self._image_key(a, asked), f"{a[4]}_{a[3]}")
            samples.append((j, sample))
        from lmms_vg.passes import same_grid

        for group in same_grid(self.adapter, [s.image for _, s in samples]):
            for n, record in zip(group, runner.score([samples[n][1] for n in group])):
                records[samples[n][0]] = record
        run = self.run_record.as_dict()
        return [outputs.encode(r if r.skipped else GroundingRecord(**{**r.__dict__, "run": run})) for r in records]

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


def misplaced_options(model: str, options: dict, method: str | None) -> Exception:
    """Why ``--model_args`` holds names this id does not take: another family's options, another method's settings, or
    names nothing takes."""
    names = sorted(options)
    for family in presets.FAMILIES.values():
        taken = [n for n in names if n in family.options]
        if taken:
            return ValueError(
                f"{', '.join(taken)} apply to {family.label or family.name} models only; this model's geometry is fixed by its processor"
            )
    if any(n in cls.argument_names() for cls in METHODS.values() for n in names):
        return ValueError(
            f"{', '.join(names)}: settings of the _pai / _adaptvis / _vicrop ids, or of VGRefine (its _vgrefine ids or vgrefine=on) "
            f"(README 'Methods'); this id runs {method or 'no method'}"
        )
    return TypeError(f"{model}: unknown model_args {names}; see README 'Model arguments'")
