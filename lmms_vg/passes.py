"""The forward passes grounding and VGRefine run, behind one interface.

:class:`Passes` (one per model, holding the per-image reference maps) opens a :class:`PassBatch`
for a batch of (image, question) pairs. The adapter decides which implementation serves it:

- :class:`SharedPrefixBatch` (``adapter.shares_prefix``, every shipped family): the image prefix
  runs once into a KV cache and every text (question, generic prompt, knocked-out generation) runs
  as a suffix on it; M-RoPE models (Qwen2-VL family) carry the prefix's position shift over;
- :class:`FullPromptBatch`: every (image, text) as a whole left-padded prompt, for a family that
  cannot split its prompt after the image; the tests hold the shared prefix equal to it.

Both offer the same four things: maps for sets of texts, the questions' maps with the generic
prompt's (from the cache where it has them), a knockout plan for the text after the image, and
generation under it. Grounding and VGRefine are each one code path on them.

Shared prefix, in detail: a batch of prompts that all begin with the same-length image prefix (template head + image
tokens) runs the vision tower and the prefix once; each suffix (question, generic reference
prompt, knocked-out generation) then runs on the cached prefix. Suffixes of different lengths
are left-padded *inside the suffix region* (``[prefix][pad][suffix]``) and position ids come
from the attention mask, so every real token sees exactly the positions and keys it would see in
an unpadded single-prompt forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import engine, internals


@dataclass
class PrefixState:
    """A batch's shared image prefix in the KV cache."""

    cache: object  # transformers Cache, cropped back to prefix_len after every suffix pass
    prefix_ids: torch.Tensor  # [B, P]
    image_cols: torch.Tensor  # [B, N] positions of the image tokens (inside the prefix)
    position_offset: torch.Tensor | None = None  # [B, 1]: M-RoPE's shift of the text after the image (Qwen2-VL family)

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[1]


def run_prefix(model, prefix: list[list[int]], pixel_inputs: dict, image_token_id: int, extra: dict | None = None) -> PrefixState:
    """Vision tower + prefix tokens once, into a KV cache. All prefixes must have the same length.

    A model with multimodal RoPE (Qwen2-VL family) computes the prefix's 3-D positions itself and
    keeps ``rope_deltas``: how far the text after the image is shifted from its index. The suffix
    passes add it to their positions, and ``generate()`` reads it from the model, so every suffix
    token gets the position it has in the whole prompt.
    """
    ids = prefix_tensor(model, prefix)
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None  # recomputed for this prefix
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **pixel_inputs, **(extra or {}))
    offset = getattr(inner, "rope_deltas", None)
    return PrefixState(internals.output_cache(out), ids, engine.image_token_positions(ids, image_token_id), offset)


def prefix_tensor(model, prefix: list[list[int]]) -> torch.Tensor:
    """The prefixes as one ``[B, P]`` tensor on the model's device; they must share one length (one token grid)."""
    lengths = {len(p) for p in prefix}
    if len(lengths) != 1:
        raise ValueError(f"prefixes differ in length {sorted(lengths)}; group the batch by prefix length")
    return torch.tensor(prefix, device=model.device)


def prefix_with_maps(
    model,
    prefix: list[list[int]],
    suffix_sets: list[list[list[int]]],
    pixel_inputs: dict,
    image_token_id: int,
    pad_id: int,
    layers: frozenset[int] | None = None,
    keep: Resume | None = None,
    extra: dict | None = None,
) -> tuple[PrefixState, list[torch.Tensor]]:
    """The image prefix's pass with one or two sets of suffixes riding on it; the maps of :func:`suffix_maps`, without its pass.

    Each sample's row is ``[prefix][set 0][set 1]``, every set left-padded in its own region and
    given the positions it has after the prefix alone (for models whose positions are token
    indices); set 1's rows are blocked from set 0's region at every layer, so each set sees the
    prefix and itself only, as in a pass of its own. The cache is cropped back to the prefix.
    With ``keep``, set 0's rows are kept below its depth (their layout is that of the set padded alone).
    Above the deepest captured layer only the prefix's rows go on (:func:`prefix_rows_only`), where
    the model's decoder layers allow it (:mod:`lmms_vg.internals`); else every row goes on to the top.
    """
    try:
        return _prefix_with_maps(model, prefix, suffix_sets, pixel_inputs, image_token_id, pad_id, layers, keep, extra)
    except internals.Unsupported as err:
        internals.turn_off(model, err)
        if keep is not None:
            keep.clear()
        return _prefix_with_maps(model, prefix, suffix_sets, pixel_inputs, image_token_id, pad_id, layers, keep, extra)


def _prefix_with_maps(model, prefix, suffix_sets, pixel_inputs, image_token_id, pad_id, layers, keep, extra):
    if len(suffix_sets) not in (1, 2):
        raise ValueError(f"{len(suffix_sets)} sets of suffixes; the prefix pass carries one or two")
    prefix_ids = prefix_tensor(model, prefix)
    batch, width = prefix_ids.shape
    regions = [pad_suffixes(s, pad_id, model.device) for s in suffix_sets]
    ids = torch.cat([prefix_ids, *(r_ids for r_ids, _ in regions)], dim=1)
    mask = torch.cat([torch.ones_like(prefix_ids), *(r_mask for _, r_mask in regions)], dim=1)
    positions = torch.cat(
        [torch.arange(width, device=model.device).expand(batch, width)]
        + [width + (r_mask.cumsum(-1) - 1).clamp(min=0) for _, r_mask in regions],
        dim=1,
    )
    ends = (width + torch.tensor([r_ids.shape[1] for r_ids, _ in regions]).cumsum(0)).tolist()
    total = ids.shape[1]
    image_cols = engine.image_token_positions(prefix_ids, image_token_id)
    cap = engine.Capture(rows=torch.tensor(ends, device=model.device).expand(batch, -1) - 1, cols=image_cols, layers=layers)
    decoder = engine.text_decoder_layers(model)
    depth = max(layers) + 1 if layers else len(decoder)  # the texts' rows are done after this many layers
    knockout = None
    if len(regions) == 2:  # set 1 must not see set 0, at every layer the texts run
        rows = engine.span_mask(total, [ends[0]] * batch, [ends[1]] * batch)
        cols = engine.span_mask(total, [width] * batch, [ends[0]] * batch)
        knockout = engine.Knockout(frozenset(range(depth)), rows, cols, mode="mask")
    hooks = [keep.watch(model, slice(None), width)] if keep is not None else []
    if internals.of(model).row_cut:
        for layer in decoder[depth:]:  # above it only the prefix rows go on, to fill its cache
            hooks.append(layer.register_forward_pre_hook(prefix_rows_only(width), with_kwargs=True))
    try:
        with torch.no_grad(), engine.arm(model, capture=cap, knockout=knockout):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **pixel_inputs,
                **(extra or {}),
            )
    finally:
        for hook in hooks:
            hook.remove()
    cache = internals.output_cache(out)
    if keep is not None:
        keep.take_cache(cache, slice(None), width)
    truncate(cache, width)
    maps = cap.stacked()  # [B, layers, heads, sets, N]
    return PrefixState(cache, prefix_ids, image_cols), [maps[:, :, :, j] for j in range(len(regions))]


def prefix_rows_only(width: int):
    """A forward pre-hook (with kwargs) that runs a decoder layer on the first ``width`` rows of the pass only.

    The rows after them leave the pass: the prefix's rows never attend to later ones, so theirs are
    the values the prefix alone gives. The layer's hidden states, attention mask, positions and
    position embeddings are cut to those rows (the decoder hands every layer the full-length ones).
    Any other tensor the layer is handed could be per token: :class:`~lmms_vg.internals.Unsupported`.
    """

    def hook(_module, args, kwargs):
        unknown = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in internals.ROW_INPUTS | {"hidden_states"})
        if unknown or len(args) > 1:
            raise internals.Unsupported(
                "row cut", f"the decoder layers are handed {unknown or 'positional inputs'} besides the hidden states"
            )
        hidden = args[0] if args else kwargs.pop("hidden_states")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = mask[..., :width, :width]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., :width]
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(t[:, :width] for t in kwargs["position_embeddings"])
        return (hidden[:, :width], *args[1:]), kwargs

    return hook


def pad_suffixes(suffixes: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad suffixes to one length: ids ``[B, S]``, mask ``[B, S]``."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def suffix_inputs(state: PrefixState, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> dict:
    """Model kwargs for running a suffix on the cached prefix."""
    mask = torch.cat([torch.ones_like(state.prefix_ids), suffix_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, state.prefix_len :]
    if state.position_offset is not None:
        positions = positions + state.position_offset.to(positions.device)
    return {"input_ids": suffix_ids, "attention_mask": mask, "position_ids": positions}


def suffix_maps(
    model,
    state: PrefixState,
    suffix_sets: list[list[list[int]]],
    pad_id: int,
    layers: frozenset[int] | None = None,
    knockout: engine.Knockout | None = None,
    steer: Steering | None = None,
    keep: Resume | None = None,
) -> list[torch.Tensor]:
    """Last-token attention to the image tokens for each set of suffixes, in one batched pass.

    With ``keep`` (a :class:`Resume` with its depth set), the first set's rows are kept as they leave
    the layers below that depth (their keys and values, and the hidden state), for a later pass that
    computes the same rows to resume there.

    ``suffix_sets[j][b]`` is sample b's j-th suffix (e.g. j=0 the question, j=1 the generic prompt);
    returns one ``[B, layers, heads, N]`` fp32 tensor per set. The cached prefix is repeated for the
    sets and restored afterwards (cropped back to the prefix, batch B), ready for the next suffix.
    With ``layers`` given, the forward stops after the deepest of them. A ``knockout`` (one set
    only; rows and cols in this pass's padded layout) is applied while capturing.
    """
    k, batch = len(suffix_sets), state.prefix_ids.shape[0]
    if knockout is not None and k != 1:
        raise ValueError("a knockout applies to a single set of suffixes")
    interleaved = [suffix_sets[j][b] for b in range(batch) for j in range(k)]  # matches repeat_interleave
    ids, mask = pad_suffixes(interleaved, pad_id, model.device)
    if k > 1:
        state.cache.batch_repeat_interleave(k)
    offset = None if state.position_offset is None else state.position_offset.repeat_interleave(k, 0)
    wide = PrefixState(state.cache, state.prefix_ids.repeat_interleave(k, 0), state.image_cols.repeat_interleave(k, 0), offset)
    last = torch.full((ids.shape[0], 1), state.prefix_len + ids.shape[1] - 1, device=model.device)
    cap = engine.Capture(rows=last, cols=wide.image_cols, layers=layers, stop_early=layers is not None)
    plan = None
    if steer is not None:  # the widened batch's layout: prefix + padded suffix, sample b's sets side by side
        cols = torch.zeros(ids.shape[0], state.prefix_len + ids.shape[1], dtype=torch.bool)
        plan = steer.plan(cols.scatter_(1, wide.image_cols.cpu(), True), k)
    # with ``keep``: the first set's rows (0::k), their last keep.width columns: the layout of that set padded alone
    hook = keep.watch(model, slice(0, None, k), ids.shape[1] - keep.width) if keep is not None else None
    try:
        with torch.no_grad(), engine.arm(model, capture=cap, knockout=knockout, steer=plan):
            model(**suffix_inputs(wide, ids, mask), **internals.cache_arg(model, state.cache), use_cache=True, logits_to_keep=1)
    except engine.CaptureComplete:
        pass
    finally:
        if hook is not None:
            hook.remove()
            keep.take_cache(state.cache, slice(0, None, k), state.prefix_len + ids.shape[1] - keep.width)
        if k > 1:
            state.cache.batch_select_indices(torch.arange(0, batch * k, k, device=model.device))
        truncate(state.cache, state.prefix_len)
    maps = cap.last_row_maps()
    return [maps[j::k] for j in range(k)]


@dataclass
class Resume:
    """The question rows as they leave the layers below ``depth``: per layer their suffix keys and values, and the hidden state.

    Below the first knockout layer a knocked-out pass computes exactly what the plain question pass
    computed; resuming from here skips those layers (:func:`resumed_generate`).
    """

    depth: int
    width: int  # the questions' suffixes padded alone
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer: [B, kv_heads, width, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [B, width, hidden]

    def watch(self, model, rows: slice, start: int):
        """A hook (remove it after the pass) keeping ``rows``' hidden state as it leaves the layers below the depth, ``width`` columns from ``start`` of the pass."""
        layer = engine.text_decoder_layers(model)[self.depth - 1]

        def take(_module, _args, out):
            out = out[0] if isinstance(out, tuple) else out
            self.hidden = out[rows, start : start + self.width].detach().clone()

        return layer.register_forward_hook(take)

    def take_cache(self, cache, rows: slice, start: int) -> None:
        """After the pass: ``rows``' keys and values in the layers below the depth, ``width`` cache positions from ``start``."""
        for cached in cache.layers[: self.depth]:
            self.keys.append(cached.keys[rows, :, start : start + self.width].clone())
            self.values.append(cached.values[rows, :, start : start + self.width].clone())

    @property
    def complete(self) -> bool:
        return self.hidden is not None and len(self.keys) == self.depth

    def clear(self) -> None:
        """Forget what a failed pass kept."""
        self.keys, self.values, self.hidden = [], [], None


class _Resumed(torch.nn.Module):
    """A decoder layer below the resume depth, for one pass: it appends the kept keys and values and hands on the kept state.

    The cache arrives under the keyword the decoder layers take (``cache_kwarg``, detected at load).
    """

    def __init__(self, index: int, resume: Resume, cache_kwarg: str):
        super().__init__()
        self.index, self.resume, self.cache_kwarg = index, resume, cache_kwarg

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get(self.cache_kwarg)
        if cache is None or not hasattr(cache, "update"):
            raise internals.Unsupported("resume", f"decoder layer {self.index} was handed no cache as {self.cache_kwarg!r}")
        cache.update(self.resume.keys[self.index], self.resume.values[self.index], self.index)
        return self.resume.hidden if self.index == self.resume.depth - 1 else hidden_states


def resumed_generate(
    model, state: PrefixState, suffixes: list[list[int]], pad_id: int, resume: Resume, knockout: engine.Knockout | None, **generate_kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy generation after the suffixes on the cached prefix, the layers below ``resume.depth`` taken from it, not recomputed.

    The first token comes from one pass through the layers from the resume depth up (under the
    knockout); the rest from ``generate()`` continuing on the completed cache. Same tokens and
    logits as :func:`suffix_generate`.
    """
    ids, mask = pad_suffixes(suffixes, pad_id, model.device)
    layers = engine.text_decoder_layers(model)
    originals = [layers[i] for i in range(resume.depth)]
    for i in range(resume.depth):
        layers[i] = _Resumed(i, resume, internals.of(model).layer_cache_kwarg)
    try:
        with torch.no_grad(), engine.arm(model, knockout=knockout):
            out = model(**suffix_inputs(state, ids, mask), **internals.cache_arg(model, state.cache), use_cache=True, logits_to_keep=1)
    except internals.Unsupported as err:
        out = err
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if isinstance(out, internals.Unsupported):  # the exact path: every layer from 0
        internals.turn_off(model, out)
        truncate(state.cache, state.prefix_len)
        return suffix_generate(model, state, suffixes, pad_id, knockout=knockout, **generate_kwargs)
    first_logits = out.logits[:, -1]
    first = first_logits.argmax(-1, keepdim=True)
    new = generate_kwargs.get("max_new_tokens", 1)
    if new > 1:
        kwargs = {**generate_kwargs, "max_new_tokens": new - 1, "min_new_tokens": max(0, generate_kwargs.get("min_new_tokens", 0) - 1)}
        kwargs.pop("output_logits", None)
        inputs = after_prefix(model, state, torch.cat([ids, first], dim=1), torch.cat([mask, torch.ones_like(first)], dim=1))
        rest, _ = generate_new_tokens(model, inputs, **kwargs)
        eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        done = torch.isin(first[:, 0], torch.tensor(eos, device=first.device)) if eos else torch.zeros_like(first[:, 0], dtype=torch.bool)
        rest = rest.masked_fill(done[:, None], generate_kwargs.get("pad_token_id", pad_id))  # generate() stops a sample at its EOS
        first = torch.cat([first, rest], dim=1)
    return first, (first_logits if generate_kwargs.get("output_logits") else None)


def can_resume(generate_kwargs: dict) -> bool:
    """Greedy, one sequence, no logits processors: the first token is the argmax, which a resumed pass reproduces."""
    plain = not generate_kwargs.get("do_sample") and generate_kwargs.get("num_beams", 1) == 1
    return plain and not generate_kwargs.get("logits_processor") and not generate_kwargs.get("repetition_penalty")


def truncate(cache, length: int) -> None:
    """Drop every cached position from ``length`` on, layer by layer.

    Layers differ in length after a pass that stopped early (CaptureComplete), so each is cut by its
    own excess (the cache API crops by a negative count).
    """
    for layer in cache.layers:
        extra = layer.get_seq_length() - length if layer.is_initialized else 0
        if extra > 0:
            layer.crop(-extra)


def suffix_generate(
    model, state: PrefixState, suffixes: list[list[int]], pad_id: int, knockout: engine.Knockout | None = None, **generate_kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generate after each suffix on the cached prefix (consumes the cache).

    Returns the new tokens ``[B, new]`` and, with ``output_logits=True``, the first step's logits ``[B, vocab]``.
    """
    ids, mask = pad_suffixes(suffixes, pad_id, model.device)
    return generate_new_tokens(model, after_prefix(model, state, ids, mask), knockout, **generate_kwargs)


def after_prefix(model, state: PrefixState, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """generate()'s inputs for the rows ``ids`` after the cached prefix (prefix ids included, as generate() expects)."""
    if state.position_offset is not None:  # generate() shifts the text positions by the model's stored deltas: this prefix's
        model.model.rope_deltas = state.position_offset
    full_ids = torch.cat([state.prefix_ids, ids], dim=1)
    full_mask = torch.cat([torch.ones_like(state.prefix_ids), mask], dim=1)
    return {"input_ids": full_ids, "attention_mask": full_mask, **internals.cache_arg(model, state.cache)}


def generate_new_tokens(
    model, inputs: dict, knockout: engine.Knockout | None = None, steer: engine.Steer | None = None, **generate_kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``generate()`` under an optional knockout or steer: the new tokens ``[B, new]`` and, with ``output_logits=True``, the first step's raw logits."""
    with torch.no_grad(), engine.arm(model, knockout=knockout, steer=steer):
        out = model.generate(**inputs, return_dict_in_generate=True, **generate_kwargs)
    first = out.logits[0] if getattr(out, "logits", None) else None
    return out.sequences[:, inputs["input_ids"].shape[1] :], first


def suffix_rows(state: PrefixState, suffixes: list[list[int]]) -> torch.Tensor:
    """Bool ``[B, P + S]``: the real suffix tokens (the text after the image), in the padded layout."""
    width = max(len(s) for s in suffixes)
    total = state.prefix_len + width
    ends = torch.full((len(suffixes),), total)
    starts = ends - torch.tensor([len(s) for s in suffixes])
    return engine.span_mask(total, starts, ends)


def full_prompt_maps(
    adapter, images, text_sets: list[list[str]], layers: frozenset[int] | None = None, steer: Steering | None = None
) -> list[torch.Tensor]:
    """Without a shared prefix: every (image, text) as a full prompt, all sets in one left-padded batch.

    ``text_sets[j][b]`` is sample b's j-th prompt text; returns one ``[B, layers, heads, N]`` per set.
    """
    k = len(text_sets)
    batch = adapter.encode([img for img in images for _ in range(k)], [text_sets[j][b] for b in range(len(images)) for j in range(k)])
    plan = steer.plan((batch["input_ids"] == adapter.image_token_id).cpu(), k) if steer is not None else None
    maps = last_row_maps(adapter, batch, layers, steer=plan)
    return [maps[j::k] for j in range(k)]


def last_row_maps(
    adapter, batch: dict, layers: frozenset[int] | None = None, knockout: engine.Knockout | None = None, steer: engine.Steer | None = None
) -> torch.Tensor:
    """Last-token attention to the image tokens of an encoded left-padded batch: ``[B, layers, heads, N]`` fp32.

    With ``layers`` given, the forward stops after the deepest of them; a ``knockout`` or ``steer`` is applied while capturing.
    """
    cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id, adapter.name)
    last = torch.full((cols.shape[0], 1), batch["input_ids"].shape[1] - 1, device=cols.device)
    cap = engine.Capture(rows=last, cols=cols, layers=layers, stop_early=layers is not None)
    try:
        with torch.no_grad(), engine.arm(adapter.model, capture=cap, knockout=knockout, steer=steer):
            adapter.model(**batch, logits_to_keep=1)
    except engine.CaptureComplete:
        pass
    return cap.last_row_maps()


def full_prompt_knockout(adapter, batch: dict, keep: torch.Tensor, layers: tuple[int, ...], mode: str) -> engine.Knockout:
    """Knockout for a left-padded full-prompt batch: every token after the image blocked from the patches not kept."""
    ids = batch["input_ids"]
    cols = engine.image_token_positions(ids, adapter.image_token_id, adapter.name)
    rows = engine.span_mask(ids.shape[1], (cols[:, -1] + 1).cpu(), [ids.shape[1]] * ids.shape[0])
    blocked = torch.zeros(ids.shape, dtype=torch.bool).scatter_(1, cols.cpu(), ~keep.cpu())
    return engine.Knockout(layers=frozenset(layers), rows=rows, cols=blocked, mode=mode)


@dataclass(frozen=True)
class Steering:
    """A method's steer for a batch of samples, before a pass's layout is known: its kind, layers, one value per sample."""

    kind: engine.SteerKind
    layers: frozenset[int]
    values: torch.Tensor  # [B]
    steps: engine.SteerSteps

    def plan(self, cols: torch.Tensor, repeats: int = 1) -> engine.Steer:
        """The engine's steer for a pass whose rows are each sample ``repeats`` times in a row, image tokens at ``cols``."""
        return engine.Steer(self.layers, cols, self.kind, self.values.repeat_interleave(repeats), self.steps)


class KnockoutPlan(Protocol):
    """What grounding needs of a method that knocks patches out (VGRefine's config is one)."""

    knockout_layers: tuple[int, ...]
    mode: str

    @property
    def map_layers(self) -> frozenset[int] | None: ...

    def keep(self, question: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[B, N]``: the patches kept, from the question maps and the reference maps ``[B, L, H, N]``."""


class ReferenceCache:
    """Generic-prompt maps per (image, prompt, layers), least recently used first out (bounded)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple | None) -> torch.Tensor | None:
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: tuple | None, maps: torch.Tensor) -> None:
        if key is None or self.size <= 0:
            return
        self._items[key] = maps
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def same_grid(adapter, images) -> list[list[int]]:
    """Indices of ``images`` grouped by token grid: a batch's shared prefix holds one image-token count (one group for LLaVA's fixed grid)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for n, image in enumerate(images):
        t = adapter.transform(image)
        groups.setdefault((t.rows, t.cols), []).append(n)
    return list(groups.values())


class Passes:
    """One model's passes: opens a batch on the implementation its adapter allows; keeps the reference maps across batches."""

    def __init__(self, adapter, reference_cache_size: int = 64):
        self.adapter = adapter
        self.cache = ReferenceCache(reference_cache_size)

    def batch(self, images, texts: list[str], image_keys: list[str | None] | None = None) -> PassBatch:
        """A batch of (image, question) pairs; ``image_keys`` name the images for the reference cache (None: not cached)."""
        kind = SharedPrefixBatch if self.adapter.shares_prefix else FullPromptBatch
        return kind(self.adapter, list(images), list(texts), list(image_keys or [None] * len(images)), self.cache)


class PassBatch:
    """The passes over one batch of (image, question) pairs; subclasses say how a text reaches the model."""

    def __init__(self, adapter, images: list, texts: list[str], image_keys: list[str | None], cache: ReferenceCache):
        self.adapter, self.images, self.texts, self.image_keys, self.cache = adapter, images, texts, image_keys, cache

    def maps(self, text_sets: list[list[str]], layers: frozenset[int] | None = None, steer: Steering | None = None) -> list[torch.Tensor]:
        """Last-token attention to the image tokens, ``[B, layers, heads, N]`` per set; ``text_sets[j][b]`` is sample b's j-th text.

        Under a ``steer`` (a method such as PAI), every set's last row is steered with its sample's value.
        """
        raise NotImplementedError

    def knockout(self, keep: torch.Tensor, layers: tuple[int, ...], mode: str) -> engine.Knockout:
        """Block the patches not kept (bool ``[B, N]``) for every token after the image of the question prompts, at ``layers``."""
        raise NotImplementedError

    def question_maps(self, knockout: engine.Knockout | None = None) -> torch.Tensor:
        """The questions' maps ``[B, layers, heads, N]``, under a knockout."""
        raise NotImplementedError

    def generate(self, knockout: engine.Knockout | None = None, **generate_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New tokens ``[B, new]`` after each question (and, with ``output_logits=True``, the first step's logits ``[B, vocab]``)."""
        raise NotImplementedError

    def resume_point(self, depth: int) -> Resume | None:
        """Where a knocked-out pass of the questions may resume (layers below ``depth`` kept), or None where it cannot."""
        return None

    def question_and_reference(
        self, prompt: str | None, layers: frozenset[int] | None = None, steer: Steering | None = None, keep: Resume | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Maps ``[B, L, H, N]`` for the questions and for the generic ``prompt`` (None: no reference, normalisation off).

        The prompt's maps come from the cache, or are computed in the same batched pass as the
        questions and cached.
        """
        how = [None] * len(self.texts) if steer is None else [(steer.kind, float(v)) for v in steer.values]  # a steered map is another map
        keys = [(k, prompt, layers, h) if k is not None and prompt else None for k, h in zip(self.image_keys, how)]
        cached = [self.cache.get(k) for k in keys]
        if prompt is None or all(c is not None for c in cached):
            question = self.maps([self.texts], layers, steer, keep)[0]
            return question, (torch.stack(cached) if prompt else None)
        question, fresh = self.maps([self.texts, [prompt] * len(self.texts)], layers, steer, keep)
        for i, key in enumerate(keys):
            if cached[i] is None:
                cached[i] = fresh[i]
                self.cache.put(key, fresh[i])
        return question, torch.stack(cached)


class SharedPrefixBatch(PassBatch):
    """The image prefix once, in a KV cache; every text a suffix on it (generation consumes the cache).

    The prefix runs with the batch's first maps where the model's positions are token indices (the
    texts ride on its pass: :func:`prefix_with_maps`), else on its own before them.
    """

    def __init__(self, adapter, images, texts, image_keys, cache):
        super().__init__(adapter, images, texts, image_keys, cache)
        prompts = adapter.split_prompts(images, texts)
        self.prefix, self.suffixes = prompts.prefix, prompts.suffix
        self.pad = adapter.tokenizer.pad_token_id
        self._state: PrefixState | None = None

    @property
    def state(self) -> PrefixState:
        """The image prefix in the KV cache (run now if no pass has run it yet)."""
        if self._state is None:
            pixels, extra = self._image_inputs()
            self._state = run_prefix(self.adapter.model, self.prefix, pixels, self.adapter.image_token_id, extra)
        return self._state

    def _image_inputs(self) -> tuple[dict, dict]:
        """The pixels and what else the model needs to run the image prefix (Qwen2-VL: the token types)."""
        ids = torch.tensor(self.prefix, device=self.adapter.device)
        return self.adapter.pixel_inputs(self.images), self.adapter.prefix_inputs(ids)

    def _suffixes(self, texts: list[str]) -> list[list[int]]:
        return self.suffixes if texts is self.texts else self.adapter.split_prompts(self.images, texts).suffix

    def maps(self, text_sets, layers=None, steer=None, keep=None):
        sets = [self._suffixes(t) for t in text_sets]
        adapter = self.adapter
        if self._state is None and steer is None and len(sets) <= 2 and adapter.positions_by_index:
            pixels, extra = self._image_inputs()
            self._state, maps = prefix_with_maps(
                adapter.model, self.prefix, sets, pixels, adapter.image_token_id, self.pad, layers, keep, extra
            )
            return maps
        return suffix_maps(adapter.model, self.state, sets, self.pad, layers=layers, steer=steer, keep=keep)

    def resume_point(self, depth: int) -> Resume | None:
        if depth == 0 or internals.of(self.adapter.model).layer_cache_kwarg is None:
            return None
        return Resume(depth, max(len(s) for s in self.suffixes))

    def knockout(self, keep, layers, mode):
        rows = suffix_rows(self.state, self.suffixes)
        cols = torch.zeros_like(rows).scatter_(1, self.state.image_cols.cpu(), ~keep.cpu())
        return engine.Knockout(layers=frozenset(layers), rows=rows, cols=cols, mode=mode)

    def question_maps(self, knockout=None):
        return suffix_maps(self.adapter.model, self.state, [self.suffixes], self.pad, knockout=knockout)[0]

    def generate(self, knockout=None, resume: Resume | None = None, **generate_kwargs):
        if resume is not None and resume.complete and can_resume(generate_kwargs) and internals.of(self.adapter.model).layer_cache_kwarg:
            return resumed_generate(self.adapter.model, self.state, self.suffixes, self.pad, resume, knockout, **generate_kwargs)
        return suffix_generate(self.adapter.model, self.state, self.suffixes, self.pad, knockout=knockout, **generate_kwargs)


class FullPromptBatch(PassBatch):
    """Every (image, text) a whole left-padded prompt; all sets of a call in one batch."""

    def __init__(self, adapter, images, texts, image_keys, cache):
        super().__init__(adapter, images, texts, image_keys, cache)
        self._encoded: dict | None = None

    @property
    def encoded(self) -> dict:
        """The question prompts, encoded once for the knockout and generation."""
        if self._encoded is None:
            self._encoded = self.adapter.encode(self.images, self.texts)
        return self._encoded

    def maps(self, text_sets, layers=None, steer=None, keep=None):
        return full_prompt_maps(self.adapter, self.images, text_sets, layers, steer)

    def knockout(self, keep, layers, mode):
        return full_prompt_knockout(self.adapter, self.encoded, keep, layers, mode)

    def question_maps(self, knockout=None):
        return last_row_maps(self.adapter, self.encoded, knockout=knockout)

    def generate(self, knockout=None, resume: Resume | None = None, **generate_kwargs):
        return generate_new_tokens(self.adapter.model, self.encoded, knockout, **generate_kwargs)
