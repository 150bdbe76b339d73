"""Grounding metrics (SPEC section 2), vectorised over any leading dims (layers, heads).

Every function takes attention ``maps`` ``[..., n_tokens]`` and a bool ``box`` ``[n_tokens]``
(the union of the ground-truth boxes' cells) and returns ``[...]``.
"""

from __future__ import annotations

import numpy as np
import torch

REFERENCE_EPS = 1e-10  # VGRefine's triage guard (the authors' eval_utils.py); grounding divides with none
AR_EPS = 1e-8
KL_CLIP = 1e-12
JS_EPS = 1e-8


def normalise_by_reference(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """VGRefine's triage normalisation (the authors' eval_utils.py): question maps over the generic prompt's, plus 1e-10."""
    return maps / (reference + REFERENCE_EPS)


def relative_attention(maps: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding's normalisation as the authors divide (measure_attention.py ``att_maps / general_att_maps``): no epsilon.

    maps, reference ``[..., n_tokens]`` -> the ratio (float64) and ``undefined`` bool ``[...]``: the maps whose
    reference holds an exact zero (an underflow, e.g. in bf16), where the ratio is infinite or NaN. Their cells
    read 0 in the ratio; their metrics are NaN (:func:`grounding_metrics`) and the caller counts them.
    """
    maps, reference = maps.double(), reference.double()
    zero = reference == 0
    ratio = torch.where(zero, torch.zeros_like(maps), maps / torch.where(zero, torch.ones_like(reference), reference))
    return ratio, zero.any(-1)


def _check_box(box: torch.Tensor, n_tokens: int) -> torch.Tensor:
    box = torch.as_tensor(box, dtype=torch.bool)
    if box.shape != (n_tokens,):
        raise ValueError(f"box mask has shape {tuple(box.shape)}, expected ({n_tokens},) to match the attention map")
    if not bool(box.any()):
        raise ValueError("box covers no image token: the grounding metrics are undefined for an empty box")
    return box


def attention_ratio(maps: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """AR = sum_B A / ((sum A / N) * |B| + 1e-8): 1 = no preference, higher = more attention in the box."""
    maps = maps.double()
    box = _check_box(box, maps.shape[-1])
    inside = maps[..., box].sum(-1)
    mean = maps.sum(-1) / maps.shape[-1]
    return inside / (mean * box.sum() + AR_EPS)


def _distributions(maps: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    maps = maps.double()
    box = _check_box(box, maps.shape[-1])
    p = maps / maps.sum(-1, keepdim=True)
    g = box.double() / box.sum()
    return p, g.expand_as(p)


def kl_to_box(maps: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """KL(G || P), G uniform over the box, P the normalised map; both clipped to [1e-12, 1]. Lower is better."""
    p, g = _distributions(maps, box)
    p, g = p.clamp(KL_CLIP, 1.0), g.clamp(KL_CLIP, 1.0)
    return (g * (g / p).log()).sum(-1)


def js_to_box(maps: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between P and G (natural log, eps 1e-8). Lower is better."""
    p, g = _distributions(maps, box)
    m = (p + g) / 2

    def kl(x: torch.Tensor) -> torch.Tensor:
        return (x * ((x + JS_EPS) / (m + JS_EPS)).log()).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(g)


def attention_iou(maps: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU between the |B| highest-attention tokens and the box tokens."""
    box = _check_box(box, maps.shape[-1])
    k = int(box.sum())
    top = torch.zeros(maps.shape, dtype=torch.bool)
    top.scatter_(-1, maps.topk(k, dim=-1).indices.cpu(), True)
    inter = (top & box).sum(-1).double()
    return inter / (2 * k - inter)


METRICS = {"ar": attention_ratio, "kl": kl_to_box, "js": js_to_box, "iou": attention_iou}


def grounding_metrics(maps: torch.Tensor, box: torch.Tensor, undefined: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """All four metrics for ``maps`` ``[..., n_tokens]``: name -> float64 array ``[...]``; NaN where ``undefined`` ``[...]``."""
    values = {name: fn(maps, box).cpu().numpy() for name, fn in METRICS.items()}
    if undefined is not None:
        mask = undefined.cpu().numpy()
        for value in values.values():
            value[mask] = np.nan
    return values
