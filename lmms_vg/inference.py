"""Forward passes that share one image prefix between several prompts.

A batch of prompts that all begin with the same-length image prefix (template head + image
tokens) runs the vision tower and the prefix once; each suffix (question, generic reference
prompt, knocked-out generation) then runs on the cached prefix. Suffixes of different lengths
are left-padded *inside the suffix region* (``[prefix][pad][suffix]``) and position ids come
from the attention mask, so every real token sees exactly the positions and keys it would see in
an unpadded single-prompt forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import engine


@dataclass
class PrefixState:
    """A batch's shared image prefix in the KV cache."""

    cache: object  # transformers Cache, cropped back to prefix_len after every suffix pass
    prefix_ids: torch.Tensor  # [B, P]
    image_cols: torch.Tensor  # [B, N] positions of the image tokens (inside the prefix)

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[1]


def run_prefix(model, prefix: list[list[int]], pixel_inputs: dict, image_token_id: int) -> PrefixState:
    """Vision tower + prefix tokens once, into a KV cache. All prefixes must have the same length."""
    lengths = {len(p) for p in prefix}
    if len(lengths) != 1:
        raise ValueError(f"prefixes differ in length {sorted(lengths)}; group the batch by prefix length")
    ids = torch.tensor(prefix, device=model.device)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **pixel_inputs)
    return PrefixState(out.past_key_values, ids, engine.image_token_positions(ids, image_token_id))


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
    return {"input_ids": suffix_ids, "attention_mask": mask, "position_ids": positions}


def suffix_maps(
    model,
    state: PrefixState,
    suffix_sets: list[list[list[int]]],
    pad_id: int,
    layers: frozenset[int] | None = None,
    knockout: engine.Knockout | None = None,
) -> list[torch.Tensor]:
    """Last-token attention to the image tokens for each set of suffixes, in one batched pass.

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
    wide = PrefixState(state.cache, state.prefix_ids.repeat_interleave(k, 0), state.image_cols.repeat_interleave(k, 0))
    last = torch.full((ids.shape[0], 1), state.prefix_len + ids.shape[1] - 1, device=model.device)
    cap = engine.Capture(rows=last, cols=wide.image_cols, layers=layers, stop_early=layers is not None)
    try:
        with torch.no_grad(), engine.arm(model, capture=cap, knockout=knockout):
            model(**suffix_inputs(wide, ids, mask), past_key_values=state.cache, use_cache=True, logits_to_keep=1)
    except engine.CaptureComplete:
        pass
    finally:
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
    full_ids = torch.cat([state.prefix_ids, ids], dim=1)
    full_mask = torch.cat([torch.ones_like(state.prefix_ids), mask], dim=1)
    return generate_new_tokens(
        model, {"input_ids": full_ids, "attention_mask": full_mask, "past_key_values": state.cache}, knockout, **generate_kwargs
    )


def generate_new_tokens(
    model, inputs: dict, knockout: engine.Knockout | None = None, **generate_kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``generate()`` under an optional knockout: the new tokens ``[B, new]`` and, with ``output_logits=True``, the first step's logits."""
    with torch.no_grad(), engine.arm(model, knockout=knockout):
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


def full_prompt_maps(adapter, images, text_sets: list[list[str]], layers: frozenset[int] | None = None) -> list[torch.Tensor]:
    """Without a shared prefix: every (image, text) as a full prompt, all sets in one left-padded batch.

    ``text_sets[j][b]`` is sample b's j-th prompt text; returns one ``[B, layers, heads, N]`` per set.
    """
    k = len(text_sets)
    batch = adapter.encode([img for img in images for _ in range(k)], [text_sets[j][b] for b in range(len(images)) for j in range(k)])
    maps = last_row_maps(adapter, batch, layers)
    return [maps[j::k] for j in range(k)]


def last_row_maps(adapter, batch: dict, layers: frozenset[int] | None = None, knockout: engine.Knockout | None = None) -> torch.Tensor:
    """Last-token attention to the image tokens of an encoded left-padded batch: ``[B, layers, heads, N]`` fp32.

    With ``layers`` given, the forward stops after the deepest of them; a ``knockout`` is applied while capturing.
    """
    cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id, adapter.name)
    last = torch.full((cols.shape[0], 1), batch["input_ids"].shape[1] - 1, device=cols.device)
    cap = engine.Capture(rows=last, cols=cols, layers=layers, stop_early=layers is not None)
    try:
        with torch.no_grad(), engine.arm(adapter.model, capture=cap, knockout=knockout):
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
