"""The transformers internals lmms-vg relies on beyond its registered attention function, each detected once per model.

The attention engine reaches a model only through transformers' ``AttentionInterface`` registry,
which survives releases. Four faster paths need more than that, and each is checked when the model
is installed (:func:`detect`, called by :func:`lmms_vg.engine.install`):

- **the cache keyword** of the model's ``forward`` and ``generate`` (``cache`` from transformers
  5.24, ``past_key_values`` before): every pass on a cached image prefix passes it by that name;
- **the resumed knocked-out pass** swaps the decoder layers below the first knockout layer for
  ones that append kept keys and values to the cache; it needs the cache keyword the decoder layers
  are called with. Without it VGRefine's knocked-out pass runs from layer 0 (same outputs, slower);
- **the row cut** (a forward pre-hook that runs a layer on the image prefix's rows only, above the
  deepest captured layer) rewrites the layer's ``hidden_states``, ``attention_mask``,
  ``position_ids`` and ``position_embeddings``; a layer that takes other per-token inputs cannot
  be cut, and every row goes through every layer instead (same outputs, slower);
- **M-RoPE's shift** (Qwen2-VL family): ``rope_deltas`` on the base model, which the suffix passes
  read and generation restores. Without it the family runs full prompts.

Each fallback is the exact path the faster one is tested against; one line in the log names the
transformers version and the path taken. A check that passed at load but fails in a pass
(:class:`Unsupported`) turns that path off for the model, with the same line, and the pass reruns.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass

import torch
import transformers

log = logging.getLogger(__name__)

CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.24, and before
ROW_INPUTS = frozenset({"attention_mask", "position_ids", "position_embeddings"})  # what the row cut rewrites
PASSED_THROUGH = frozenset({*CACHE_NAMES, "use_cache", "output_attentions"})


class Unsupported(RuntimeError):
    """A faster path met an internal it does not know, during a pass: the caller reruns the exact path."""

    def __init__(self, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


@dataclass(frozen=True)
class Internals:
    """What an installed model offers the faster paths (see the module's docstring)."""

    cache_kwarg: str = "past_key_values"
    layer_cache_kwarg: str | None = None  # None: no resumed pass
    row_cut: bool = False
    rope_deltas: bool = False  # True only for a model that keeps M-RoPE's shift


def _parameters(fn) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def detect(model: torch.nn.Module, layers: torch.nn.ModuleList) -> Internals:
    """What ``model`` (its text decoder's ``layers``) offers, from signatures and attributes: no pass is run."""
    forward = _parameters(model.forward)
    cache_kwarg = next((name for name in CACHE_NAMES if name in forward), "past_key_values")
    layer = _parameters(type(layers[0]).forward) if len(layers) else {}
    layer.pop("self", None)
    names = [name for name, p in layer.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]  # **kwargs: checked in the pass
    layer_cache = next((name for name in CACHE_NAMES if name in layer), None)
    row_cut = bool(names) and names[0] == "hidden_states" and set(names[1:]) <= ROW_INPUTS | PASSED_THROUGH
    base = getattr(model, "model", None)
    rope_deltas = base is not None and hasattr(base, "get_rope_index") and hasattr(base, "rope_deltas")
    found = Internals(cache_kwarg, layer_cache, row_cut, rope_deltas)
    for line in _fallback_lines(found, model, names):
        log.warning(line)
    return found


def _fallback_lines(found: Internals, model, layer_inputs: list[str]) -> list[str]:
    version = f"transformers {transformers.__version__}"
    name = type(model).__name__
    lines = []
    if found.layer_cache_kwarg is None:
        lines.append(
            f"lmms-vg: {version}: {name}'s decoder layers take no cache keyword lmms-vg knows ({layer_inputs}); "
            "VGRefine's knocked-out pass runs from layer 0 (same outputs, slower)"
        )
    if not found.row_cut:
        lines.append(
            f"lmms-vg: {version}: {name}'s decoder layers take inputs the row cut does not know ({layer_inputs}); "
            "every row of the image prefix's pass runs through every layer (same outputs, slower)"
        )
    return lines


def of(model: torch.nn.Module) -> Internals:
    """The model's internals, as detected when it was installed (detected now for a model installed otherwise)."""
    found = getattr(model, "_lmms_vg_internals", None)
    if found is None:
        from .engine import text_decoder_layers

        found = model._lmms_vg_internals = detect(model, text_decoder_layers(model))
    return found


def turn_off(model: torch.nn.Module, err: Unsupported) -> None:
    """A path that failed in a pass is off for this model from now on; one line says so."""
    field = {"resume": "layer_cache_kwarg", "row cut": "row_cut"}[err.path]
    model._lmms_vg_internals = dataclasses.replace(of(model), **{field: None if field == "layer_cache_kwarg" else False})
    log.warning(f"lmms-vg: transformers {transformers.__version__}: {err}; {type(model).__name__} takes the exact full path from now on")


def cache_arg(model: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` for the model's ``forward`` and ``generate``."""
    return {of(model).cache_kwarg: cache}


def output_cache(out):
    """The cache a forward returned (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    for name in CACHE_NAMES:
        if name in out:
            return out[name]
    return None
