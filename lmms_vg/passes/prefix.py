"""The image prefix in the KV cache, and the texts that run on it: in the prefix's own pass, or after it.

The prefix (template head + image tokens) runs once; each suffix (question, generic prompt, knocked-out
generation) runs on the cached prefix, left-padded inside its own region so that every real token sees
the positions and keys it would see in an unpadded single-prompt forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import engine, internals
from ..adapters import left_padded

if TYPE_CHECKING:
    from ..methods.base import Steering
    from .resume import Resume


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
    with torch.no_grad():  # a pass from position 0: M-RoPE models compute this prefix's deltas afresh
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **pixel_inputs, **(extra or {}))
    offset = getattr(getattr(model, "model", None), "rope_deltas", None)
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
                **with_text_after(extra or {}, width, total),
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


def with_text_after(per_token: dict, width: int, total: int) -> dict:
    """The prefix's per-token inputs (``[B, width]``, e.g. Gemma 3's token types) widened to ``total`` columns: the texts
    riding after the prefix are text tokens, type 0."""
    out = {}
    for key, value in per_token.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == width:
            value = torch.cat([value, value.new_zeros(value.shape[0], total - width)], dim=1)
        out[key] = value
    return out


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
    batch = left_padded(suffixes, pad_id, device)
    return batch["input_ids"], batch["attention_mask"]


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
