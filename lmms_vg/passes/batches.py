"""A model's passes over batches of (image, question) pairs: the shared image prefix where the adapter allows it, else full prompts.

Both implementations offer the same four things: maps for sets of texts, the questions' maps with the
generic prompt's (from a per-image cache where it has them), a knockout plan for the text after the
image, and generation under it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from .. import engine, internals
from .prefix import PrefixState, generate_new_tokens, prefix_with_maps, run_prefix, suffix_generate, suffix_maps, suffix_rows
from .resume import Resume, can_resume, resumed_generate

if TYPE_CHECKING:
    from ..methods.base import Steering


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
        if key is None:
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
        args = (self.adapter, list(images), list(texts), list(image_keys or [None] * len(images)), self.cache)
        if self.adapter.shares_prefix:
            shared = SharedPrefixBatch(*args)
            if shared.fits_window([shared.suffixes]):
                return shared
        return FullPromptBatch(*args)


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

    def fits_window(self, sets: list[list[list[int]]]) -> bool:
        """Whether a pass of the prefix and these sets of suffixes stays inside the model's sliding window (no window: always).

        Inside it a sliding layer sees what a full layer sees, whatever the layout, and its cache can be
        cut back to the prefix; beyond it the same texts run as full prompts (same maps, no sharing).
        """
        window = self.adapter.window
        return window is None or len(self.prefix[0]) + sum(max(map(len, s)) for s in sets) < window

    def maps(self, text_sets, layers=None, steer=None, keep=None):
        sets = [self._suffixes(t) for t in text_sets]
        adapter = self.adapter
        if not self.fits_window(sets):
            return full_prompt_maps(adapter, self.images, text_sets, layers, steer)
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
        if (
            resume is not None
            and resume.complete
            and can_resume(self.adapter.model, generate_kwargs)
            and internals.of(self.adapter.model).layer_cache_kwarg
        ):
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
