"""VGMED grounding analysis of one batch: normalised attention maps -> per-layer metrics.

Maps never leave this module: each sample leaves as a :class:`GroundingRecord` of
``layers`` numbers per metric (plus ``layers x heads`` KL in head-level mode), so a run's
memory grows with samples x layers, not samples x maps. Maps can be written to disk on request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from . import files, geometry, metrics
from .adapters import rgb
from .outputs import GroundingRecord
from .passes import Passes
from .prompts import GENERIC_PROMPT, SHORT_ANSWER
from .reasons import located

if TYPE_CHECKING:
    from .methods.base import KnockoutPlan

log = logging.getLogger(__name__)


@dataclass
class GroundingSample:
    """What a grounding sample needs: the image, the question, its boxes in original pixels."""

    image: Image.Image
    question: str
    boxes: Sequence[Sequence[float]]
    box_format: geometry.BoxFormat = "xyxy"
    image_key: str | None = None  # for the per-image reference cache; None = no caching
    sample_id: str = ""


class GroundingRunner:
    """Scores grounding samples for one model (SPEC sections 1-2)."""

    def __init__(
        self,
        adapter,
        reference_prompt: str | None = GENERIC_PROMPT + SHORT_ANSWER,
        reference_cache_size: int = 64,
        head_level: bool = False,
        save_maps: str | Path | None = None,
        knockout: KnockoutPlan | None = None,
        steering=None,
    ):
        """``knockout`` (e.g. a VGRefine config): measure the question's attention with its knockout in place.

        ``steering`` (``(images, questions) -> passes.Steering``, e.g. PAI's): measure it under that method's steer.
        """
        self.adapter = adapter
        self.steering = steering
        self.passes = Passes(adapter, reference_cache_size)
        self.knockout = knockout
        self.reference_prompt = reference_prompt
        self.head_level = head_level
        self.save_maps = Path(save_maps) if save_maps else None
        self.kept: torch.Tensor | None = None  # the last batch's patches the knockout kept, row-major ``[B, N]`` (None without one)
        self._warned_clip = False
        if self.save_maps:
            self.save_maps.mkdir(parents=True, exist_ok=True)

    def question_and_reference_maps(self, images, questions, image_keys) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw maps ``[B, L, H, N]`` for the questions and for the generic prompt (None if normalisation is off)."""
        batch = self.passes.batch(images, questions, image_keys)
        steer = self.steering(images, questions) if self.steering is not None else None
        question, reference = batch.question_and_reference(self.reference_prompt, steer=steer)
        plan = self.knockout
        self.kept = None
        if plan is not None:  # the same question, now with the knockout in place
            self.kept = plan.keep(question, reference)
            question = batch.question_maps(batch.knockout(self.kept, plan.knockout_layers, plan.mode))
        order = self.adapter.cell_order  # image tokens -> row-major cells, where a model orders them otherwise
        if order is not None:
            question, reference = question[..., order], (None if reference is None else reference[..., order])
            self.kept = None if self.kept is None else self.kept[..., order]
        return question, reference

    def score(self, samples: list[GroundingSample]) -> list[GroundingRecord]:
        records: list[GroundingRecord | None] = [None] * len(samples)
        cells = []
        for i, s in enumerate(samples):
            transform = self.adapter.transform(s.image)
            try:
                c = geometry.box_cells(s.boxes, s.box_format, transform)
            except ValueError as err:  # a malformed box costs its own sample
                cells.append(None)
                records[i] = GroundingRecord(skipped=located(f"malformed box: {err}", s.sample_id))
                continue
            cells.append((c, transform))
            if c.n_clipped and not self._warned_clip:
                log.warning("sample %s: a box reaches outside the image and was clipped (counted per sample as n_clipped)", s.sample_id)
                self._warned_clip = True
            if not c.n_boxes:
                records[i] = GroundingRecord(skipped=located("no box", s.sample_id))
            elif not c.mask.any():
                records[i] = GroundingRecord(n_boxes=c.n_boxes, n_clipped=c.n_clipped, skipped="box has zero area inside the image")
        todo = [i for i, r in enumerate(records) if r is None]
        if todo:
            q, ref = self.question_and_reference_maps(
                [samples[i].image for i in todo], [samples[i].question for i in todo], [samples[i].image_key for i in todo]
            )
            kept = self.kept  # the patches a knockout kept, per sample, row-major (None without one)
            for j, i in enumerate(todo):
                records[i] = self._record(samples[i], cells[i], q[j], None if ref is None else ref[j], None if kept is None else kept[j])
        return records

    def _record(self, sample, cell_info, q: torch.Tensor, ref: torch.Tensor | None, kept: torch.Tensor | None = None) -> GroundingRecord:
        c, transform = cell_info
        if q.shape[-1] != c.mask.size:
            raise ValueError(f"model gives {q.shape[-1]} image tokens but its grid is {transform.rows}x{transform.cols}")
        box = torch.from_numpy(c.mask)
        layer_q = q.mean(1)
        # divided as the authors divide (no epsilon); a layer whose reference holds an exact zero is left undefined
        layer_maps, undefined = (layer_q, None) if ref is None else metrics.relative_attention(layer_q, ref.mean(1))
        values = metrics.grounding_metrics(layer_maps, box, undefined)
        record = GroundingRecord(
            **{k: v.tolist() for k, v in values.items()},
            n_boxes=c.n_boxes,
            n_clipped=c.n_clipped,
            zero_reference_layers=0 if undefined is None else int(undefined.sum()),
            exif_orientation=int(sample.image.info.get(files.ROTATED, 0)),
        )
        if self.head_level:
            head_maps, head_undefined = (q, None) if ref is None else metrics.relative_attention(q, ref)
            head_kl = metrics.kl_to_box(head_maps, box).cpu().numpy()
            if head_undefined is not None:
                head_kl[head_undefined.cpu().numpy()] = np.nan
            record.head_kl = head_kl.tolist()
        if self.save_maps:
            self._save(sample, transform, layer_maps, c.mask, layer_q, kept)
        return record

    def _save(
        self,
        sample: GroundingSample,
        transform,
        layer_maps: torch.Tensor,
        box: np.ndarray,
        question: torch.Tensor,
        kept: torch.Tensor | None,
    ) -> None:
        """One sample's normalised maps and the question's own head-averaged maps (float16), with what a heatmap needs:
        the image, the boxes, the geometry."""
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sample.sample_id) or "sample"
        thumb = rgb(sample.image)  # the one conversion (16-bit rescaled, not clipped to white)
        shrink = min(1.0, 336 / max(thumb.size))
        if shrink < 1.0:
            thumb = thumb.resize((round(thumb.width * shrink), round(thumb.height * shrink)))
        boxes = [geometry.to_xyxy(b, sample.box_format) for b in sample.boxes]

        # ratios to a near-zero reference overflow float16 (max 65504); every metric is scale-invariant per layer,
        # so each layer is saved scaled to a maximum of 1
        def scaled(maps: torch.Tensor) -> np.ndarray:
            return (maps / maps.amax(-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)).numpy().astype(np.float16)

        np.savez_compressed(
            self.save_maps / f"{name}.npz",
            maps=scaled(layer_maps),  # [layers, rows * cols], each layer's max = 1
            question_maps=scaled(question),  # the same, not divided by the reference: where the question's attention goes
            box=box,
            grid=np.array([transform.rows, transform.cols]),
            transform=np.array(
                [transform.scale_x, transform.scale_y, transform.offset_x, transform.offset_y, transform.cell, transform.cell_h]
            ),
            image=np.asarray(thumb),
            image_size=np.array([sample.image.width, sample.image.height]),
            boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
            question=np.array(sample.question),
            knockout_layers=np.array(self.knockout.knockout_layers if self.knockout else (), dtype=np.int64),
            kept=np.zeros(0, dtype=bool) if kept is None else kept.cpu().numpy().astype(bool),  # row-major cells VGRefine kept
        )
