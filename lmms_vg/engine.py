"""The attention engine: one attention function, registered with transformers, driven by a per-call plan.

Every text decoder layer of an installed model runs through :func:`vg_attention`, which first
computes exactly what plain SDPA computes and then, only for the layers and query rows named by
the armed plan,

* **captures** the post-softmax weights from chosen query rows to the image-token columns,
  in fp32, for those rows alone (no ``output_attentions``, no repeated K for GQA);
* **knocks out** chosen image columns for chosen query rows, either before the softmax
  (``mask``: the authors' code, remaining weights renormalise) or after it (``zero``: the
  paper's formula, weights kept, blocked value vectors zeroed for those rows);
* **steers** the last query row of each call: its pre-softmax logits to chosen columns are
  edited (PAI's ``a + alpha|a|``, AdaptVis's ``a * w``), in the prefill, the decoding steps, or both.

Positions are indices into the (left-padded) input sequence. A query row's position is
``kv_len - q_len + i``, so the same plan works in a plain forward, in the prefill of
``generate()`` and on top of a prefix already in the KV cache; decode steps are never in a plan's
rows and run untouched. Rows outside the plan are the SDPA output itself, bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import internals

ATTN_IMPLEMENTATION = "lmms_vg"
KnockoutMode = Literal["mask", "zero"]
KNOCKOUT_MODES: tuple[str, ...] = ("mask", "zero")


class EngineError(RuntimeError):
    """A model or input the attention engine cannot serve; the message says what to do."""


class CaptureComplete(Exception):
    """Raised after the deepest captured layer when the capture asked to stop there (see Capture.stop_early)."""


@dataclass
class Capture:
    """What to capture: attention from ``rows`` to ``cols`` at ``layers`` (None = every layer).

    rows: [batch, n_rows] query positions; cols: [batch, n_image] image-token positions.
    After the forward, ``maps[layer]`` holds fp32 weights ``[batch, heads, n_rows, n_image]``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    layers: frozenset[int] | None = None
    stop_early: bool = False  # raise CaptureComplete once the deepest of ``layers`` is captured
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self) -> torch.Tensor:
        """Captured maps indexed by layer: ``[batch, deepest captured layer + 1, heads, n_rows, n_image]``.

        Layers that were not captured (a capture of chosen layers) hold zeros.
        """
        if not self.maps:
            raise EngineError(
                "no attention was captured: the armed model ran no text decoder layer through "
                f"attn_implementation='{ATTN_IMPLEMENTATION}', or the capture rows were never in a prompt chunk"
            )
        first = next(iter(self.maps.values()))
        out = first.new_zeros((first.shape[0], max(self.maps) + 1, *first.shape[1:]))
        for layer, weights in self.maps.items():
            out[:, layer] = weights
        return out

    def last_row_maps(self) -> torch.Tensor:
        """The usual case, one query row per sample: ``[batch, layers, heads, n_image]``."""
        return self.stacked()[:, :, :, -1, :]


@dataclass
class Knockout:
    """Block ``cols`` for ``rows`` at ``layers``. rows, cols: bool ``[batch, prompt_len]`` over positions."""

    layers: frozenset[int]
    rows: torch.Tensor
    cols: torch.Tensor
    mode: KnockoutMode = "mask"

    def __post_init__(self) -> None:
        if self.mode not in KNOCKOUT_MODES:
            raise ValueError(f"knockout mode {self.mode!r} is not one of {KNOCKOUT_MODES}")
        if self.rows.shape != self.cols.shape or self.rows.dtype != torch.bool or self.cols.dtype != torch.bool:
            raise ValueError("knockout rows and cols must be bool tensors of the same shape [batch, prompt_len]")


SteerKind = Literal["amplify", "scale"]
SteerSteps = Literal["all", "prefill", "decode"]  # every call; the prompt's pass only; the decoding steps only


@dataclass
class Steer:
    """Edit the last query row's pre-softmax logits to ``cols`` at ``layers``, in the calls ``steps`` names.

    ``amplify``: ``a + value * |a|`` (PAI); ``scale``: ``a * value`` (AdaptVis). ``value`` is one
    number per sample (``[batch]``); ``cols`` bool ``[batch, prompt_len]`` (the image tokens).
    ``steps``: ``all``, ``prefill`` (the prompt's pass: more than one query row) or ``decode`` (one-row
    steps after it: PAI with guidance, whose edit its logits processor switches on after the first token).
    """

    layers: frozenset[int]
    cols: torch.Tensor
    kind: SteerKind
    value: torch.Tensor
    steps: SteerSteps = "all"

    def __post_init__(self) -> None:
        if self.kind not in ("amplify", "scale"):
            raise ValueError(f"steer kind {self.kind!r} is not 'amplify' or 'scale'")
        if self.steps not in ("all", "prefill", "decode"):
            raise ValueError(f"steer steps {self.steps!r} is not 'all', 'prefill' or 'decode'")
        if self.cols.dtype != torch.bool or self.value.shape != (self.cols.shape[0],):
            raise ValueError("steer cols must be bool [batch, prompt_len] and value one number per sample [batch]")

    def applies(self, layer: int, q_len: int) -> bool:
        return layer in self.layers and (self.steps == "all" or (self.steps == "prefill") == (q_len > 1))

    def edit(self, scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``scores`` ``[B, H, R, kv]`` (the rows to steer), ``cols`` ``[B, kv]``: the edited logits."""
        value = self.value.to(scores.device, scores.dtype)[:, None, None, None]
        edited = scores + value * scores.abs() if self.kind == "amplify" else scores * value
        return torch.where(cols[:, None, None, :], edited, scores)


@dataclass
class _ArmedPlan:
    layer_of: dict[int, int]  # id(attention module) -> layer index, for the one armed model
    capture: Capture | None
    knockout: Knockout | None
    steer: Steer | None = None


_ACTIVE: contextvars.ContextVar[_ArmedPlan | None] = contextvars.ContextVar("lmms_vg_plan", default=None)


def vg_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function: plain SDPA, plus the armed plan's capture and knockout rows."""
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    plan = _ACTIVE.get()
    layer = None if plan is None else plan.layer_of.get(id(module))
    if layer is None:
        return out, None
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    start = key.shape[2] - query.shape[2]
    ko = plan.knockout
    if ko is not None and layer in ko.layers:
        out = _knockout_rows(out, query, key, value, attention_mask, scale, start, ko)
    steer = plan.steer if plan.steer is not None and plan.steer.applies(layer, query.shape[2]) else None
    if steer is not None:
        out = _steer_last_row(out, query, key, value, attention_mask, scale, start, steer)
    cap = plan.capture
    if cap is not None and (cap.layers is None or layer in cap.layers):
        weights = _capture_rows(query, key, attention_mask, scale, start, cap, ko if ko and layer in ko.layers else None, steer)
        if weights is not None:
            cap.maps[layer] = weights
            if cap.stop_early and cap.layers is not None and layer == max(cap.layers):
                raise CaptureComplete  # the layers above change nothing that was asked for
    return out, None


def _allowed(attention_mask: torch.Tensor | None, positions: torch.Tensor, local: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Bool ``[batch|1, 1, rows, kv_len]``: which keys the given query rows may attend to in the plain forward."""
    if attention_mask is None:  # SDPA skipped the mask: causal, no padding
        keys = torch.arange(kv_len, device=positions.device)
        return (keys[None, :] <= positions[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, :, local, :kv_len]
    return attention_mask[:, :, local, :kv_len] > torch.finfo(attention_mask.dtype).min / 2


def _knockout_rows(out, query, key, value, attention_mask, scale, start, ko: Knockout) -> torch.Tensor:
    """Recompute only the knocked-out rows of this chunk and write them into ``out`` ([batch, q, heads, dim])."""
    q_len, kv_len = query.shape[2], key.shape[2]
    # plans are built on the CPU; each layer may sit on its own device (device_map=auto)
    rows = _fit(ko.rows, start + q_len)[:, start : start + q_len].to(query.device)  # [B, q] this chunk's rows
    local = rows.any(0).nonzero().flatten()
    if local.numel() == 0:
        return out
    cols = _fit(ko.cols, kv_len).to(query.device)  # [B, kv]
    allowed = _allowed(attention_mask, local + start, local, kv_len)
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    if ko.mode == "mask":
        allowed = allowed & ~cols[:, None, None, :]
    else:  # zero: softmax weights as they were, blocked value vectors contribute nothing
        v = v * (~cols)[:, None, :, None].to(v.dtype)
    knocked = torch.nn.functional.scaled_dot_product_attention(query[:, :, local, :], k, v, attn_mask=allowed, scale=scale).transpose(
        1, 2
    )  # [B, R, H, D]
    keep_plain = ~rows[:, local]  # rows another sample knocks out but this one does not
    out = out.clone()
    out[:, local] = torch.where(keep_plain[:, :, None, None], out[:, local], knocked.to(out.dtype))
    return out


def _steer_last_row(out, query, key, value, attention_mask, scale, start, steer: Steer) -> torch.Tensor:
    """Recompute the chunk's last query row with its logits to the steered columns edited, and write it into ``out``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    last = torch.tensor([q_len - 1], device=query.device)
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups).float(), repeat_kv(value, groups).float()
    scores = query[:, :, q_len - 1 :, :].float() @ k.transpose(-1, -2) * scale  # [B, H, 1, kv]
    scores = scores.masked_fill(~_allowed(attention_mask, last + start, last, kv_len), float("-inf"))
    scores = steer.edit(scores, _fit(steer.cols, kv_len).to(query.device))
    row = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [B, 1, H, D]
    out = out.clone()
    out[:, q_len - 1 :] = row.to(out.dtype)
    return out


def _capture_rows(
    query, key, attention_mask, scale, start, cap: Capture, ko: Knockout | None, steer: Steer | None = None
) -> torch.Tensor | None:
    """fp32 post-softmax weights ``[batch, heads, rows, n_image]`` for the capture rows, or None if not in this chunk."""
    q_len, kv_len = query.shape[2], key.shape[2]
    local = cap.rows.to(query.device) - start  # [B, R]
    if bool(((local < 0) | (local >= q_len)).any()):
        return None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = torch.gather(query, 2, local[:, None, :, None].expand(batch, heads, -1, dim)).float()
    q = q.view(batch, kv_heads, heads // kv_heads, local.shape[1], dim)  # GQA: group, never repeat K
    scores = torch.einsum("bkgrd,bknd->bkgrn", q, key.float()).reshape(batch, heads, local.shape[1], kv_len) * scale
    allowed = _capture_allowed(attention_mask, local, start, kv_len)
    blocked = None
    if ko is not None:  # [B, rows, kv]: the knockout this layer applies to the capture rows
        ko_rows, ko_cols = _fit(ko.rows, kv_len).to(query.device), _fit(ko.cols, kv_len).to(query.device)
        blocked = ko_rows.gather(1, local + start)[:, :, None] & ko_cols[:, None, :]
    if blocked is not None and ko.mode == "mask":
        allowed = allowed & ~blocked[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if steer is not None:  # the capture rows that are the chunk's last row are steered
        last = (local == q_len - 1)[:, None, :, None]
        scores = torch.where(last, steer.edit(scores, _fit(steer.cols, kv_len).to(query.device)), scores)
    weights = torch.softmax(scores, dim=-1)
    if blocked is not None and ko.mode == "zero":
        weights = weights * (~blocked[:, None]).float()
    cols = cap.cols.to(query.device)
    return torch.gather(weights, 3, cols[:, None, None, :].expand(batch, heads, local.shape[1], -1))


def _capture_allowed(attention_mask, local: torch.Tensor, start: int, kv_len: int) -> torch.Tensor:
    """Bool ``[batch, 1, rows, kv_len]`` for per-sample capture rows."""
    batch, n_rows = local.shape
    keys = torch.arange(kv_len, device=local.device)
    causal = keys[None, None, :] <= (local + start)[:, :, None]
    if attention_mask is None:
        return causal[:, None]
    rows_mask = attention_mask.expand(batch, -1, -1, -1)[:, 0]  # [B, q, kv]
    picked = torch.gather(rows_mask, 1, local[:, :, None].expand(batch, n_rows, rows_mask.shape[-1]))[..., :kv_len]
    if picked.dtype != torch.bool:
        picked = picked > torch.finfo(picked.dtype).min / 2
    return picked[:, None]


def _fit(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (with False) or cut a ``[batch, T]`` bool mask to ``length`` positions."""
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)


def register() -> None:
    """Register the attention function and its mask function under one name (idempotent).

    The mask function must be registered too: transformers looks masks up by the same name and,
    without one, builds no padding mask for an unknown implementation.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, vg_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def text_decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text decoder's layers (a ModuleList the decoder loops over)."""
    return _text_decoder(model).layers


def text_attention_layers(model: torch.nn.Module) -> dict[int, int]:
    """Map id(attention module) -> layer index for the model's text decoder layers."""
    decoder = _text_decoder(model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise EngineError(f"{type(model).__name__}: found no decoder `layers` in its language model; see README 'Adding a model'")
    found = {}
    for index, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise EngineError(f"{type(model).__name__}: decoder layer {index} has no `self_attn`; see README 'Adding a model'")
        found[id(attn)] = index
    return found


def _text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        sub = getattr(inner, name, None)
        if sub is not None:
            return getattr(sub, "model", sub)
    if hasattr(inner, "layers"):
        return inner
    raise EngineError(
        f"{type(model).__name__} is not a supported architecture: lmms-vg finds the text decoder as "
        "`model.language_model` (LLaVA, Qwen2-VL families). See README 'Adding a model'."
    )


def install(model: torch.nn.Module) -> dict[int, int]:
    """Route the model's text decoder attention through lmms-vg; the vision tower keeps its own.

    Returns the layer map that :func:`arm` uses. Raises EngineError for a model whose attention
    cannot be swapped (no AttentionInterface dispatch, or no SDPA support to delegate to).
    """
    name = type(model).__name__
    layer_map = text_attention_layers(model)
    decoder = _text_decoder(model)  # its own class says how it dispatches (a composite model may not say it for its parts)
    owner = decoder if hasattr(type(decoder), "_supports_attention_backend") else model
    if not getattr(owner, "_supports_attention_backend", False) or not getattr(owner, "_supports_sdpa", False):
        raise EngineError(
            f"{name}: its attention cannot be swapped (it does not dispatch through transformers' "
            "AttentionInterface with SDPA support, e.g. a flash-attention-only or remote-code model). "
            "Use a transformers-native checkpoint (see README 'Models') or subclass the wrapper."
        )
    register()
    text_key = _text_sub_config(model)
    model.set_attn_implementation({text_key: ATTN_IMPLEMENTATION} if text_key else ATTN_IMPLEMENTATION)
    model._lmms_vg_layers = layer_map
    model._lmms_vg_internals = internals.detect(model, text_decoder_layers(model))
    return layer_map


def _text_sub_config(model: torch.nn.Module) -> str | None:
    for key in getattr(model.config, "sub_configs", {}):
        if key == "text_config":
            return key
    return None


@contextlib.contextmanager
def arm(
    model: torch.nn.Module, capture: Capture | None = None, knockout: Knockout | None = None, steer: Steer | None = None
) -> Iterator[None]:
    """Arm a capture, knockout and/or steer for the calls made inside the block; nothing stays armed after it (an empty arm disarms)."""
    layer_map = getattr(model, "_lmms_vg_layers", None)
    if layer_map is None:
        raise EngineError(f"{type(model).__name__} was not prepared: call lmms_vg.engine.install(model) once after loading")
    n_layers = len(layer_map)
    for what, layers in (
        ("capture", capture and capture.layers),
        ("knockout", knockout and knockout.layers),
        ("steer", steer and steer.layers),
    ):
        bad = sorted(layer for layer in (layers or ()) if not 0 <= layer < n_layers)
        if bad:
            raise EngineError(f"{what} layers {bad} out of range: the model has {n_layers} text layers (0..{n_layers - 1})")
    token = _ACTIVE.set(_ArmedPlan(layer_map, capture, knockout, steer))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def image_token_positions(input_ids: torch.Tensor, image_token_id: int, model_name: str = "model") -> torch.Tensor:
    """Positions of the image tokens per sample: ``[batch, n_image]`` (one image per sample)."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise EngineError(
            f"{model_name}: no image tokens (id {image_token_id}) in the prompt of batch item(s) {missing}; "
            "the prompt must contain the model's image placeholder and an image must be passed"
        )
    if bool((counts != counts[0]).any()):
        raise EngineError(
            f"{model_name}: batch items have different image-token counts {counts.tolist()}; use one image of one size per sample"
        )
    return is_image.nonzero()[:, 1].view(input_ids.shape[0], -1)


def span_mask(length: int, starts: Sequence[int] | torch.Tensor, ends: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Bool ``[batch, length]`` that is True on ``[start, end)`` of each row."""
    pos = torch.arange(length)
    starts = torch.as_tensor(starts)[:, None]
    ends = torch.as_tensor(ends)[:, None]
    return (pos[None, :] >= starts) & (pos[None, :] < ends)
