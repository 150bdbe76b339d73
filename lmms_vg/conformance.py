"""The exactness battery every model family passes: ``lmms-vg check-family <id> [--pretrained DIR]``, and the tests.

A family's adapter is the whole of what lmms-vg knows of a model; these checks hold it to what the
model and its processor do, each against a reference written apart from the code it checks:

- ``encoding``: the adapter's ids for a prompt with an image equal the processor's (its placeholder
  expansion; the text tokenised as the model's original code does: the processor's way, with the BOS
  rule of its ``apply_chat_template``, or LLaVA's and HuatuoGPT-Vision's ``tokenizer_image_token``,
  transcribed), and its token types where it has them;
- ``maps`` and ``maps_left_padded``: the attention lmms-vg captures (last prompt token to the image
  tokens, every layer and head) equals transformers' eager attention, for one prompt and for a
  left-padded batch of two;
- ``shared_prefix``: maps and greedy tokens with the image prefix shared (texts riding on its pass,
  then on its cache) equal those of full prompts;
- ``vgrefine``: VGRefine's tokens and first logits equal three separate passes with eager attention
  and the knockout applied by hand (:mod:`lmms_vg.reference`);
- ``geometry``: a white marker drawn on wide, tall and square images lands, in the pixels the model
  receives (un-normalised with the processor's own mean and std), in the cells the adapter's
  geometry gives for its box.

Each check returns a :class:`Result`; one the family cannot have (no full processor, no shared
prefix) is skipped and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import engine, geometry
from .prompts import GENERIC_PROMPT, SHORT_ANSWER

QUESTIONS = ("Where is the lesion in this image?", "What is shown?")
REFERENCE_PROMPT = GENERIC_PROMPT + SHORT_ANSWER
IMAGE = -200  # the original codebases' image token index (their tokenizer_image_token)
# (width, height, marker box xyxy): wide, tall and square; off-centre and central markers
MARKERS = ((337, 113, (250, 20, 320, 90)), (337, 113, (150, 40, 190, 80)), (113, 337, (20, 260, 90, 320)), (200, 200, (30, 120, 90, 180)))


@dataclass(frozen=True)
class Result:
    name: str
    passed: bool | None  # None: skipped
    detail: str = ""

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.passed]
        return f"{mark} {self.name}{': ' + self.detail if self.detail else ''}"


def test_images(seed: int = 0) -> list[Image.Image]:
    """Two random RGB images of one size (one token grid for every family)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(2)]


# ---------------------------------------------------------------- references, written apart from the adapters
def llava_tokenizer_image_token(prompt: str, tokenizer, placeholder: str = "<image>") -> list[int]:
    """haotian-liu/LLaVA @ c121f04, llava/mm_utils.py ``tokenizer_image_token`` (LLaVA-Med, MedTrinity, VILA carry it), transcribed."""
    return _tokenizer_image_token([tokenizer(chunk).input_ids for chunk in prompt.split(placeholder)], tokenizer)


def huatuo_tokenizer_image_token(prompt: str, tokenizer, placeholder: str = "<image>") -> list[int]:
    """FreedomIntelligence/HuatuoGPT-Vision @ a6476ac, cli.py ``tokenizer_image_token``: chunks without special tokens, transcribed."""
    chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split(placeholder)]
    return _tokenizer_image_token(chunks, tokenizer)


def _tokenizer_image_token(prompt_chunks: list[list[int]], tokenizer) -> list[int]:
    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


ORIGINAL_TOKENISERS: dict[str, Callable] = {"llava": llava_tokenizer_image_token, "huatuo": huatuo_tokenizer_image_token}


def processor_batch(adapter, images, questions) -> dict | None:
    """The processor's left-padded inputs for the adapter's prompts with their images (None where the checkpoint has no full
    processor).

    The text is tokenised as the model's original code does: the processor's way (special tokens unless the
    prompt starts with the BOS, as transformers' ``ProcessorMixin.apply_chat_template``), or the transcribed
    ``tokenizer_image_token`` with the processor's image tokens spliced in.
    """
    processor = adapter.processor
    if not callable(processor):
        return None
    prompts, tokenizer = [adapter.prompt(q) for q in questions], adapter.tokenizer
    pictures = [adapter.model_image(image) for image in images]
    if adapter.tokenisation == "whole":
        bos = getattr(tokenizer, "bos_token", None)
        plain = not (bos and prompts[0].startswith(bos))
        out = processor(text=prompts, images=[[p] for p in pictures], add_special_tokens=plain, padding=True, return_tensors="pt")
        return {k: v.to(adapter.device) for k, v in out.items() if isinstance(v, torch.Tensor)}
    rows = []
    for prompt, picture in zip(prompts, pictures):
        alone = processor(text=[adapter.placeholder], images=[picture], return_tensors="pt")["input_ids"][0]
        count = int((alone == adapter.image_token_id).sum())
        ids = ORIGINAL_TOKENISERS[adapter.tokenisation](prompt, tokenizer, adapter.placeholder)
        rows.append([t for token in ids for t in ([adapter.image_token_id] * count if token == IMAGE else [token])])
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids.to(adapter.device), "attention_mask": mask.to(adapter.device), "pixel_values": pixels.to(adapter.device)}


def eager_maps(adapter, batch: dict, implementation: str = "eager") -> torch.Tensor:
    """``[B, L, H, N]``: transformers' own attention weights (``output_attentions``) of each prompt's last token to its image tokens."""
    model = adapter.model
    batch = {k: v.to(model.dtype) if k == "pixel_values" else v for k, v in batch.items()}
    model.set_attn_implementation({"text_config": implementation})
    try:
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    cols = [(ids == adapter.image_token_id).nonzero().flatten() for ids in batch["input_ids"]]
    return torch.stack([torch.stack([a[b, :, -1, cols[b]].float() for a in attentions]) for b in range(len(cols))])


def reference_vgrefine(adapter, images, questions, heads, layers, percentile: float, max_new_tokens: int):
    """VGRefine in three full-prompt passes with eager attention: the questions' maps, the generic prompt's, then generation
    with the knockout applied by hand (lmms_vg.reference); the triage as the paper states it."""
    from .reference import REFERENCE

    batch = adapter.encode(images, questions)
    q = eager_maps(adapter, batch)
    r = eager_maps(adapter, adapter.encode(images, [REFERENCE_PROMPT] * len(images)))
    T = batch["input_ids"].shape[1]
    cols = [(ids == adapter.image_token_id).nonzero().flatten() for ids in batch["input_ids"]]
    rows, blocked = torch.zeros(len(images), T, dtype=torch.bool), torch.zeros(len(images), T, dtype=torch.bool)
    for b in range(len(images)):
        triage = np.mean([q[b, l, h].numpy() / (r[b, l].mean(0).numpy() + 1e-10) for l, h in heads], axis=0)
        blocked[b, cols[b][torch.from_numpy(triage < np.percentile(triage, percentile))]] = True
        rows[b, int(cols[b][-1]) + 1 :] = True  # every prompt token after the image
    REFERENCE["knockout"] = {"layers": set(layers), "rows": rows, "cols": blocked, "mode": "mask"}
    adapter.model.set_attn_implementation({"text_config": "reference_eager"})
    try:
        with torch.no_grad():
            out = adapter.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        REFERENCE["knockout"] = None
        adapter.model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})
    return out.sequences[:, T:], out.logits[0]


def marker_image(width: int, height: int, box_xyxy) -> Image.Image:
    """Black image with a white rectangle over ``box_xyxy`` (pixels)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box_xyxy
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr)


def frame(adapter, image: Image.Image, raw: bool = True) -> np.ndarray:
    """The ``[C, H, W]`` frame the model sees for ``image``; ``raw``: un-normalised with the processor's mean and std (0..1)."""
    inputs = adapter.pixel_inputs([image])
    pixels = inputs["pixel_values"].float().cpu().numpy()
    image_processor = adapter.processor.image_processor
    if "image_grid_thw" in inputs:
        pixels = qwen2_vl_frame(pixels, inputs["image_grid_thw"][0].tolist(), patch=image_processor.patch_size)
    else:
        pixels = pixels[0]
    if not raw:
        return pixels
    mean = np.asarray(getattr(image_processor, "image_mean", None) or [0.0] * 3, dtype=np.float64)[:, None, None]
    std = np.asarray(getattr(image_processor, "image_std", None) or [1.0] * 3, dtype=np.float64)[:, None, None]
    return pixels * std + mean


def qwen2_vl_frame(pixel_values: np.ndarray, grid_thw, merge: int = 2, patch: int = 14) -> np.ndarray:
    """Qwen2-VL's flattened patches ``[gh*gw, C*T*p*p]`` (merge-grouped) back to one ``[C, H, W]`` frame."""
    _, gh, gw = (int(v) for v in grid_thw)
    p = pixel_values.reshape(gh // merge, gw // merge, merge, merge, 3, -1, patch, patch)[:, :, :, :, :, 0]
    # [bh, bw, mh, mw, C, ph, pw] -> [C, bh, mh, ph, bw, mw, pw]
    return p.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)


def landed_cells(raw: np.ndarray, cell: int) -> np.ndarray:
    """Row-major bool cells of a raw ``[C, H, W]`` frame (0..1) holding clearly white pixels."""
    white = (raw[0] > 0.75).astype(float)
    h, w = white.shape
    grid = white[: h // cell * cell, : w // cell * cell].reshape(h // cell, cell, w // cell, cell).max(axis=(1, 3))
    return grid.reshape(-1) > 0


def white_extent(raw: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of the clearly white pixels of a raw ``[C, H, W]`` frame, or None."""
    ys, xs = np.nonzero(raw[0] > 0.75)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------- the checks
def check_encoding(adapter, images) -> Result:
    theirs = processor_batch(adapter, images, QUESTIONS[: len(images)])
    if theirs is None:
        return Result(
            "encoding", None, "no full processor (the checkpoint ships a tokenizer and an image processor): tests/test_templates.py"
        )
    ours = adapter.encode(images, list(QUESTIONS[: len(images)]))
    for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in theirs and (key not in ours or ours[key].tolist() != theirs[key].tolist()):
            mine = ours[key].tolist() if key in ours else "missing"
            return Result(
                "encoding",
                False,
                f"{key} differ (the model's mask or positions would too):\n  ours   {mine}\n  theirs {theirs[key].tolist()}",
            )
    return Result("encoding", True, f"{tuple(ours['input_ids'].shape)} left-padded ids equal the processor's")


def _maps_check(name: str, adapter, images, questions, tolerance: float) -> Result:
    """Captured maps on the adapter's encoding against eager attention on the processor's (the adapter's where there is none)."""
    from .passes import FullPromptBatch, ReferenceCache

    ours = FullPromptBatch(adapter, images, questions, [None] * len(images), ReferenceCache(0)).maps([questions])[0]
    theirs = eager_maps(adapter, processor_batch(adapter, images, questions) or adapter.encode(images, questions))
    if ours.shape != theirs.shape:
        return Result(name, False, f"captured {tuple(ours.shape)}, eager {tuple(theirs.shape)}")
    worst = float((ours.cpu() - theirs.cpu()).abs().max())
    return Result(name, worst <= tolerance, f"max |captured - eager| = {worst:.2e} over {tuple(ours.shape)} (B, layers, heads, tokens)")


def check_maps(adapter, images, tolerance: float = 1e-5) -> Result:
    return _maps_check("maps", adapter, images[:1], list(QUESTIONS[:1]), tolerance)


def check_maps_left_padded(adapter, images, tolerance: float = 1e-5) -> Result:
    lengths = {len(adapter.encode([images[0]], [q])["input_ids"][0]) for q in QUESTIONS}
    if len(lengths) < 2:
        return Result("maps_left_padded", None, "the two questions encode to one length: no padding to check")
    return _maps_check("maps_left_padded", adapter, images[:2], list(QUESTIONS), tolerance)


def check_shared_prefix(adapter, images, tolerance: float = 1e-5) -> Result:
    from .passes import FullPromptBatch, ReferenceCache, SharedPrefixBatch

    if not adapter.shares_prefix:
        return Result("shared_prefix", None, f"{adapter.name} runs full prompts (its adapter's shares_prefix is false)")
    questions = list(QUESTIONS[: len(images)])
    keys = [None] * len(images)
    shared = SharedPrefixBatch(adapter, images, questions, keys, ReferenceCache(0))
    sets = [questions, [REFERENCE_PROMPT] * len(images)]
    if not shared.fits_window([shared._suffixes(t) for t in sets]):
        return Result("shared_prefix", None, f"the prompts reach the sliding window ({adapter.window}): full prompts run")
    ours = shared.maps(sets)
    full = FullPromptBatch(adapter, images, questions, keys, ReferenceCache(0))
    theirs = full.maps(sets)
    worst = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    after = SharedPrefixBatch(adapter, images, questions, keys, ReferenceCache(0))  # texts on the cached prefix, then generation
    prefix_len = after.state.prefix_len  # the prefix's own pass first: the questions run on its cache
    worst = max(worst, float((after.maps([questions])[0] - theirs[0]).abs().max()))
    tokens, _ = after.generate(max_new_tokens=4, do_sample=False)
    expected, _ = full.generate(max_new_tokens=4, do_sample=False)
    same = torch.equal(tokens.cpu(), expected.cpu())
    return Result(
        "shared_prefix",
        worst <= tolerance and same,
        f"{prefix_len}-token prefix: max |shared - full| = {worst:.2e}; greedy tokens {'equal' if same else 'differ'}",
    )


def check_vgrefine(adapter, images, tolerance: float = 1e-4) -> Result:
    from .methods.vgrefine import VGRefineConfig, VGRefiner

    text = adapter.model.config.text_config
    n_layers, n_heads = text.num_hidden_layers, text.num_attention_heads
    heads = tuple((l, h) for l in range(max(n_layers // 2, 1)) for h in range(min(n_heads, 2)))[:3]
    layers = (max(n_layers // 2, 1),)
    config = VGRefineConfig(heads=heads, knockout_layers=layers, top_k=len(heads), percentile=50, reference_prompt=REFERENCE_PROMPT)
    questions = list(QUESTIONS[: len(images)])
    ours = VGRefiner(adapter, config, reference_cache_size=0).generate(
        images, questions, max_new_tokens=4, do_sample=False, output_logits=True
    )
    tokens, logits = reference_vgrefine(adapter, images, questions, heads, layers, 50, 4)
    same = torch.equal(ours.tokens.cpu(), tokens.cpu())
    worst = float((ours.first_logits.cpu() - logits.cpu()).abs().max())
    return Result("vgrefine", same and worst <= tolerance, f"tokens {'equal' if same else 'differ'}; max |first logits| diff {worst:.2e}")


def check_geometry(adapter, images=None) -> Result:
    for width, height, box in MARKERS:
        image = marker_image(width, height, box)
        raw = frame(adapter, image)
        t = adapter.transform(image)
        # the model frame's cells: the frame cut into the grid, or (VILA's odd patch grids) cells of the geometry's size with the
        # grid's last row and column running past the frame, where the model pads
        cell = raw.shape[1] // t.rows if raw.shape[1] % t.rows == 0 else round(t.cell_h)
        where = f"{width}x{height} image, marker {box}"
        if not (0 <= t.rows * cell - raw.shape[1] < cell and 0 <= t.cols * cell - raw.shape[2] < cell):
            return Result(
                "geometry", False, f"{where}: the model's frame is {raw.shape[1:]}, the geometry's grid {t.rows}x{t.cols} of {cell} px"
            )
        raw = np.pad(raw, ((0, 0), (0, t.rows * cell - raw.shape[1]), (0, t.cols * cell - raw.shape[2])))
        cells = geometry.box_cells([box], "xyxy", t).mask
        landed = landed_cells(raw, cell)
        if not cells.any():
            if landed.any():
                return Result("geometry", False, f"{where}: the geometry says the marker was cropped away, the pixels show it")
            continue
        if not landed.any() or (landed & ~cells).any():
            return Result(
                "geometry",
                False,
                f"{where}: the marker lands in cells {np.flatnonzero(landed).tolist()}, the geometry gives {np.flatnonzero(cells).tolist()}",
            )
        fx, fy = cell / t.cell, cell / t.cell_h  # the geometry's frame to the model's
        x0, y0, x1, y1 = box
        mapped = (
            (x0 * t.scale_x + t.offset_x) * fx,
            (y0 * t.scale_y + t.offset_y) * fy,
            (x1 * t.scale_x + t.offset_x) * fx,
            (y1 * t.scale_y + t.offset_y) * fy,
        )
        mapped = (max(mapped[0], 0), max(mapped[1], 0), min(mapped[2], t.cols * cell), min(mapped[3], t.rows * cell))
        extent = white_extent(raw)
        if not np.allclose(extent, mapped, atol=2.0):
            return Result(
                "geometry", False, f"{where}: white pixels at {extent}, the geometry maps the box to {tuple(round(v, 1) for v in mapped)}"
            )
    return Result("geometry", True, f"{len(MARKERS)} marker images land in the geometry's cells")


CHECKS: dict[str, Callable] = {
    "encoding": check_encoding,
    "maps": check_maps,
    "maps_left_padded": check_maps_left_padded,
    "shared_prefix": check_shared_prefix,
    "vgrefine": check_vgrefine,
    "geometry": check_geometry,
}


def run_checks(adapter, names: list[str] | None = None, images: list[Image.Image] | None = None) -> list[Result]:
    """Every check (or the ``names`` given) on a loaded adapter; a check that raises fails with its error."""
    from . import reference  # noqa: F401  (registers the reference attention)

    unknown = sorted(set(names or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}: the battery has {', '.join(CHECKS)}")
    images = images or test_images()
    results = []
    for name in names or list(CHECKS):
        try:
            results.append(CHECKS[name](adapter, images))
        except Exception as err:  # noqa: BLE001  a broken adapter fails its check with the reason; the others still run
            results.append(Result(name, False, f"{type(err).__name__}: {err}"))
    return results


def load_adapter(model_id: str, pretrained: str | None = None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The adapter a model id runs, on its preset's checkpoint or ``pretrained``, with the attention engine installed."""
    from lmms_vg_models.loading import load_checkpoint

    from . import presets

    presets.load_families()
    if model_id in presets.FAMILIES:  # a family's name: its tiny checkpoint, or pretrained=
        preset, family = None, presets.FAMILIES[model_id]
    elif model_id in presets.PRESETS:
        preset = presets.PRESETS[model_id]
        family = presets.family_of(preset.family)
    else:
        raise ValueError(
            f"{model_id!r} is neither a model id nor a family; model ids: lmms-vg models, families: {sorted(presets.FAMILIES)}"
        )
    checkpoint = presets.resolve_checkpoint(pretrained or (preset.checkpoint if preset else ""))
    if not checkpoint:
        raise ValueError(
            f"{model_id}: no checkpoint to load; give --pretrained <folder> ({preset.note if preset else 'a family has none'})"
        )
    model, processor = load_checkpoint(checkpoint, family.model_types, dtype, None, "main", trust_remote_code)
    engine.install(model)
    as_preset = {"pad_to_square": preset.pad_to_square, "tokenisation": preset.tokenisation} if preset else {}
    return family.adapter(model, processor, preset.chat_template if preset else None, name=checkpoint, **as_preset)


def report(results: list[Result]) -> str:
    failed = sum(r.passed is False for r in results)
    passed = sum(r.passed is True for r in results)
    lines = [r.line() for r in results]
    lines.append(f"{passed} passed, {failed} failed, {len(results) - passed - failed} skipped")
    return "\n".join(lines)
