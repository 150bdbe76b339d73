"""Dataset loaders: each source's published schema -> plain docs the tasks and models share.

Where data lives is set by environment variables (no YAML editing); a missing path raises a
:class:`DataError` that names the variable to set. Grounding docs carry ``question``,
``vg_image_path``, ``vg_boxes`` (xyxy, original pixels), ``vg_image_key``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

VGMED_ROOT = "LMMS_VG_VGMED_ROOT"  # folder with VGMED_*_questions.jsonl and SLAKE's imgs/
COCO_ROOT = "LMMS_VG_COCO_ROOT"  # folder with COCO_*_questions.jsonl and val2014/
VGMED_SOURCE = "LMMS_VG_VGMED_SOURCE"  # v1 (default, local JSONL) or v2 (HF dataset guimeng-liu/VGMED)
SKIP_MISSING = "LMMS_VG_SKIP_MISSING_IMAGES"  # 1: keep going past missing images, counted as skipped
VGMED_V2_ID = "guimeng-liu/VGMED"


class DataError(FileNotFoundError):
    """Data that is not where the settings say; the message names the setting."""


def env_path(var: str, what: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise DataError(f"{what}: set {var} to the folder that holds it (see README 'Data')")
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"{what}: {var}={value} does not exist")
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n} is not valid JSON ({err})") from err
    return rows


def xywh_to_xyxy(box) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def vgmed_docs(kind: str, natural: bool = False) -> list[dict]:
    """VGMED grounding questions: ``kind`` is 'localization' or 'attribute'; ``natural`` picks the COCO control."""
    source = os.environ.get(VGMED_SOURCE, "v1")
    if source == "v2" and not natural:
        return _vgmed_v2_docs(kind)
    if source not in ("v1", "v2"):
        raise DataError(f"{VGMED_SOURCE}={source!r}: use v1 (local JSONL) or v2 (HF dataset {VGMED_V2_ID})")
    var, prefix = (COCO_ROOT, "COCO") if natural else (VGMED_ROOT, "VGMED")
    root = env_path(var, f"{prefix} {kind} questions")
    questions = root / f"{prefix}_{kind}_questions.jsonl"
    if not questions.exists():
        raise DataError(f"{questions} not found: {var} must point at the folder holding {questions.name}")
    docs = []
    for i, row in enumerate(read_jsonl(questions)):
        image = str(row["image"])
        path = root / ("val2014" if natural else "imgs") / (_coco_name(image) if natural else f"{image}/source.jpg")
        docs.append(
            {
                "id": f"{prefix.lower()}_{kind}_{i}",
                "question": str(row["question"]),
                "vg_image_path": str(path),
                "vg_image_key": image,
                "vg_boxes": [xywh_to_xyxy(b) for b in row.get("bbox") or []],
                "modality": str(row.get("modality", "natural" if natural else "")),
                "label": str(row.get("label", "")),
            }
        )
    return check_images(docs, var)


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
        docs.append(
            {
                "id": f"vgmed2_{kind}_{i}",
                "question": str(row["question"]),
                "vg_image_path": "",
                "vg_image": row["image"],
                "vg_image_key": str(row.get("image_id", i)),
                "vg_boxes": [[float(v) for v in b] for b in (row.get("bbox") or row.get("bboxes") or [])],  # v2 boxes are xyxy
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


def open_image(path: str):
    """Open an image file, with an error that names the path."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image '{path}' not found") from err
    except OSError as err:
        raise OSError(f"image '{path}' cannot be read ({err})") from err


def demo_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("lmms_vg").joinpath("demo", "data")))


def demo_grounding_docs(random_boxes: bool = False) -> list[dict]:
    """The bundled synthetic grounding set; ``random_boxes``: the control, each box moved to a random place (same size)."""
    import random

    root = demo_dir()
    rng = random.Random(0)
    docs = []
    for i, row in enumerate(read_jsonl(root / "grounding.jsonl")):
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
                "id": f"demo_{i}",
                "question": row["question"],
                "vg_image_path": str(root / row["image"]),
                "vg_image_key": row["image"],
                "vg_boxes": [[float(x0), float(y0), float(x1), float(y1)]],
                "modality": "synthetic",
                "label": row["answer"],
            }
        )
    return docs
