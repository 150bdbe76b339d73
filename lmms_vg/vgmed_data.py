"""VGMED, its COCO control and the demo's grounding set: each source's published schema -> plain docs.

Where data lives is set by environment variables (no YAML editing); a missing path raises a
:class:`DataError` that names the variable to set. Grounding docs carry ``question``,
``vg_image_path``, ``vg_boxes`` (xyxy, original pixels), ``vg_image_key``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import geometry
from .files import DataError, demo_dir, env_path, read_jsonl
from .reasons import located

log = logging.getLogger(__name__)

VGMED_ROOT = "LMMS_VG_VGMED_ROOT"  # folder with the VGMED question files and their images (either layout)
COCO_ROOT = "LMMS_VG_COCO_ROOT"  # folder with the COCO question files and images (val2014/ in v1)
COCO_ANNOTATIONS = "LMMS_VG_COCO_ANNOTATIONS"  # current layout: COCO_{kind}.jsonl kept apart from the images (optional)
VGMED_LAYOUT = "LMMS_VG_VGMED_LAYOUT"  # current or v1: which published layout to read (default: the first found)
VGMED_SOURCE = "LMMS_VG_VGMED_SOURCE"  # v1 (default, local JSONL) or v2 (HF dataset guimeng-liu/VGMED)
SKIP_MISSING = "LMMS_VG_SKIP_MISSING_IMAGES"  # 1: keep going past missing images, counted as skipped
VGMED_V2_ID = "guimeng-liu/VGMED"


@dataclass(frozen=True)
class VgmedLayout:
    """One published layout of the VGMED (or COCO control) question files."""

    name: str
    files: tuple[str, ...]  # file name patterns ({kind}: localization / attribute), first found is read
    image_path: Callable[[Path, str], Path]  # (root, the row's image field) -> image file
    box_format: Callable[[str], geometry.BoxFormat]  # the row's image field -> format of its boxes


# The authors' current code (measure_attention.py): VGMED_{kind}.jsonl beside the images, boxes xyxy
# except on images whose names start with "Slake" (xywh); COCO boxes are always xywh.
VGMED_LAYOUTS = (
    VgmedLayout(
        "current", ("VGMED_{kind}.jsonl",), lambda root, image: root / image, lambda image: "xywh" if image.startswith("Slake") else "xyxy"
    ),
    # v1 (public, SLAKE-based), published under both names: imgs/<SLAKE id>/source.jpg, boxes xywh
    VgmedLayout(
        "v1",
        ("VGMED_{kind}_questions.jsonl", "SLAKE_{kind}_questions.jsonl"),
        lambda root, image: root / "imgs" / image / "source.jpg",
        lambda _: "xywh",
    ),
)
COCO_LAYOUTS = (
    VgmedLayout("current", ("COCO_{kind}.jsonl",), lambda root, image: root / image, lambda _: "xywh"),
    VgmedLayout("v1", ("COCO_{kind}_questions.jsonl",), lambda root, image: root / "val2014" / _coco_name(image), lambda _: "xywh"),
)


def vgmed_docs(kind: str, natural: bool = False) -> list[dict]:
    """VGMED grounding questions: ``kind`` is 'localization' or 'attribute'; ``natural`` picks the COCO control.

    The question file is looked up in the layouts of :data:`VGMED_LAYOUTS` (or ``COCO_LAYOUTS``),
    first found first; ``LMMS_VG_VGMED_LAYOUT`` (``current`` or ``v1``) insists on one. Rows that
    cannot be scored (no question, no or malformed boxes) keep a ``vg_error`` naming the file and line.
    """
    source = os.environ.get(VGMED_SOURCE, "v1")
    if source == "v2" and not natural:
        return _vgmed_v2_docs(kind)
    if source not in ("v1", "v2"):
        raise DataError(f"{VGMED_SOURCE}={source!r}: use v1 (local files, either published layout) or v2 (HF dataset {VGMED_V2_ID})")
    var, prefix = (COCO_ROOT, "COCO") if natural else (VGMED_ROOT, "VGMED")
    root = env_path(var, f"{prefix} {kind} questions")
    folders = [root]
    if natural and os.environ.get(COCO_ANNOTATIONS):  # the authors' code keeps COCO's question files apart from the images
        folders.insert(0, Path(os.environ[COCO_ANNOTATIONS]).expanduser())
    layout, questions = _find_layout(folders, kind, COCO_LAYOUTS if natural else VGMED_LAYOUTS, var)
    rows = read_jsonl(questions)
    if not rows:
        raise DataError(f"{questions} has no rows; download it again, or point {var} at the right folder")
    log.info("%s %s: %d questions from %s (layout '%s')", prefix, kind, len(rows), questions, layout.name)
    docs = []
    for n, row in enumerate(rows, 1):
        image = str(row.get("image", ""))
        boxes, error = read_boxes(row, layout.box_format(image))
        if not row.get("question"):
            error = "no question: the row has no 'question'"
        if not image:
            error = "no image: the row has no 'image'"
        docs.append(
            {
                "id": f"{prefix.lower()}_{kind}_{n - 1}",
                "question": str(row.get("question", "")),
                "vg_image_path": str(layout.image_path(root, image)) if image else "",
                "vg_image_key": image,
                "vg_boxes": boxes,
                "vg_error": located(error, f"{questions.name}:{n}") if error else "",
                "modality": str(row.get("modality", "natural" if natural else "")),
                "label": str(row.get("label", "")),
            }
        )
    return check_images(docs, var)


def _find_layout(folders: list[Path], kind: str, layouts, var: str) -> tuple[VgmedLayout, Path]:
    """The first layout (``LMMS_VG_VGMED_LAYOUT`` if set) whose question file is in one of ``folders``, and that file."""
    wanted = os.environ.get(VGMED_LAYOUT, "").strip()
    if wanted and wanted not in {lay.name for lay in layouts}:
        raise DataError(f"{VGMED_LAYOUT}={wanted!r}: use one of {[lay.name for lay in layouts]}, or leave it unset to take the first found")
    searched = []
    for layout in layouts:
        if wanted and layout.name != wanted:
            continue
        for pattern in layout.files:
            for folder in folders:
                path = folder / pattern.format(kind=kind)
                searched.append(path.name)
                if path.exists():
                    return layout, path
    where = " or ".join(str(f) for f in folders)
    raise DataError(
        f"none of {sorted(set(searched))} found in {where}: {var} must point at the folder holding the question files (README 'Tasks')"
    )


def read_boxes(row: dict, box_format: geometry.BoxFormat) -> tuple[list[list[float]], str]:
    """A row's boxes (``bbox``, else ``original_bboxes``: a list of boxes) as xyxy in original pixels, or why they cannot be used."""
    raw = row.get("bbox", row.get("original_bboxes"))
    if raw is None:
        return [], "no box: the row has no 'bbox' (or 'original_bboxes') field"
    if not isinstance(raw, list) or not raw:
        return [], f"no box: 'bbox' is {raw!r}, not a non-empty list of boxes"
    if all(isinstance(v, (int, float)) for v in raw):
        return [], f"flat box: 'bbox' is {raw!r}; write a list of boxes, e.g. [{raw!r}]"
    boxes = []
    for k, box in enumerate(raw):
        try:
            values = [float(v) for v in box] if isinstance(box, (list, tuple)) and len(box) == 4 else None
        except (TypeError, ValueError):
            values = None
        if values is None:
            return [], f"malformed box: box {k} is {box!r}; a box is 4 numbers ({box_format})"
        if not all(math.isfinite(v) for v in values):
            return [], f"non-finite box: box {k} is {box!r}; every coordinate must be a finite number"
        boxes.append(list(geometry.to_xyxy(values, box_format)))
    return boxes, ""


def _coco_name(image_id: str) -> str:
    return image_id if image_id.endswith(".jpg") else f"COCO_val2014_{int(image_id):012d}.jpg"


def _vgmed_v2_docs(kind: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(VGMED_V2_ID, split="test")
    except Exception as err:  # offline or not cached: say what to do
        raise DataError(f"cannot load {VGMED_V2_ID} ({err}); download it once online, or use {VGMED_SOURCE}=v1 with {VGMED_ROOT}") from err
    docs = []
    for i, row in enumerate(ds):
        if kind and str(row.get("question_type", kind)).lower()[:3] != kind[:3]:
            continue
        boxes, error = read_boxes({"bbox": row.get("bbox") or row.get("bboxes")}, "xyxy")  # v2 boxes are xyxy
        docs.append(
            {
                "id": f"vgmed2_{kind}_{i}",
                "question": str(row["question"]),
                "vg_image_path": "",
                "vg_image": row["image"],
                "vg_image_key": str(row.get("image_id", i)),
                "vg_boxes": boxes,
                "vg_error": located(error, f"{VGMED_V2_ID} row {i}") if error else "",
                "modality": str(row.get("modality", "")),
                "label": str(row.get("label", "")),
            }
        )
    return docs


def check_images(docs: list[dict], var: str) -> list[dict]:
    """Every image path must exist, unless LMMS_VG_SKIP_MISSING_IMAGES=1 (then they are skipped and counted)."""
    missing = [d["vg_image_path"] for d in docs if d["vg_image_path"] and not os.path.exists(d["vg_image_path"])]
    if missing and os.environ.get(SKIP_MISSING) != "1":
        raise DataError(
            f"{len(missing)} image(s) not found, first: '{missing[0]}' (under {var}). "
            f"Fix the path, or set {SKIP_MISSING}=1 to skip them (each is counted as skipped)"
        )
    if missing:
        log.warning("%d image(s) missing under %s; they will be counted as skipped", len(missing), var)
    return docs


def demo_grounding_docs(random_boxes: bool = False, shifted: bool = False) -> list[dict]:
    """The bundled synthetic grounding set; ``random_boxes``: the control, each box moved to a random place (same size);
    ``shifted``: the same questions on the shifted domain's images."""
    import random

    root = demo_dir()
    rng = random.Random(0)
    docs = []
    for i, row in enumerate(read_jsonl(root / ("grounding_shifted.jsonl" if shifted else "grounding.jsonl"))):
        x0, y0, x1, y1 = row["bbox"]
        if random_boxes:
            from PIL import Image

            with Image.open(root / row["image"]) as img:
                width, height = img.size
            w, h = x1 - x0, y1 - y0
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            x1, y1 = x0 + w, y0 + h
        docs.append(
            {
                "id": f"demo_shifted_{i}" if shifted else f"demo_{i}",
                "question": row["question"],
                "vg_image_path": str(root / row["image"]),
                "vg_image_key": row["image"],
                "vg_boxes": [[float(x0), float(y0), float(x1), float(y1)]],
                "vg_error": "",
                "modality": "synthetic",
                "label": row["answer"],
            }
        )
    return docs
