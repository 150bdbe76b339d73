"""The resumed knocked-out pass: below the first knockout layer it computes what the maps pass computed, so it starts there.

The decoder layers below that depth are swapped, for one pass, for ones that append the kept keys and
values to the cache (where the model's decoder layers take the cache by a keyword lmms-vg knows:
:mod:`lmms_vg.internals`); else the exact pass from layer 0 runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import engine, internals
from .prefix import PrefixState, after_prefix, generate_new_tokens, pad_suffixes, suffix_generate, suffix_inputs, truncate


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
    new = generate_kwargs["max_new_tokens"]  # can_resume: given, and no minimum length
    if new > 1:
        kwargs = {**generate_kwargs, "max_new_tokens": new - 1}
        kwargs.pop("output_logits", None)
        inputs = after_prefix(model, state, torch.cat([ids, first], dim=1), torch.cat([mask, torch.ones_like(first)], dim=1))
        rest, _ = generate_new_tokens(model, inputs, **kwargs)
        eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        done = torch.isin(first[:, 0], torch.tensor(eos, device=first.device)) if eos else torch.zeros_like(first[:, 0], dtype=torch.bool)
        rest = rest.masked_fill(done[:, None], generate_kwargs.get("pad_token_id", pad_id))  # generate() stops a sample at its EOS
        first = torch.cat([first, rest], dim=1)
    return first, (first_logits if generate_kwargs.get("output_logits") else None)


# generate() settings that can change which token comes first (a minimum length holds back the end of sequence, the others
# edit or ban tokens); the resumed pass takes the plain argmax, so where any is set the answer takes the full pass
FIRST_TOKEN_SETTINGS = (
    "logits_processor",
    "min_new_tokens",
    "min_length",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "penalty_alpha",
)


def can_resume(model, generate_kwargs: dict) -> bool:
    """Greedy, one sequence, a set number of new tokens, nothing that edits the first step's logits: the first token is the
    argmax, which a resumed pass reproduces. A setting the call leaves out is the model's generation config's (a checkpoint
    may ship ``do_sample`` or a ``repetition_penalty``, as Qwen2.5-VL's does)."""
    config = model.generation_config

    def setting(name: str):
        return generate_kwargs[name] if name in generate_kwargs else getattr(config, name, None)

    if "max_new_tokens" not in generate_kwargs or setting("do_sample") or (setting("num_beams") or 1) != 1:
        return False
    if setting("repetition_penalty") not in (None, 1.0) or setting("guidance_scale") not in (None, 1.0):
        return False
    return not any(setting(name) for name in FIRST_TOKEN_SETTINGS)
