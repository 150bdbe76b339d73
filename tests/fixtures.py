"""Small fixture datasets in each source's published schema, written to a temp folder."""

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> None:
    """An image of the given PIL mode; 16-bit and RGBA are written as PNG bytes (PIL reads by content, not name)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "I;16":
        img = Image.fromarray((rng.random((height, width)) * 65535).astype("uint16"))
    img.save(path, format="PNG" if mode in ("RGBA", "I;16") else None)


def write_vgmed_v1(root: Path) -> Path:
    """VGMED v1: SLAKE ids, imgs/<id>/source.jpg (png here, 16-bit/grey/RGBA among them), xywh boxes, gt_tokens."""
    root.mkdir(parents=True, exist_ok=True)
    images = {"101": (120, 120, "RGB"), "102": (160, 100, "L"), "103": (90, 140, "I;16"), "104": (100, 100, "RGBA")}
    for i, (img_id, (w, h, mode)) in enumerate(images.items()):
        _image(root / "imgs" / img_id / "source.jpg", w, h, i, mode)  # SLAKE's file name, whatever the bytes
    rows = {
        "localization": [
            {
                "image": "101",
                "label": "liver",
                "location": "left",
                "modality": "CT",
                "question": "Where is the liver?",
                "gt_tokens": [[0, 0]],
                "bbox": [[10, 20, 30, 40]],
            },
            {
                "image": "101",
                "label": "lung",
                "location": "top",
                "modality": "CT",
                "question": "Where is the lung?",
                "gt_tokens": [[1, 1]],
                "bbox": [[50, 10, 20, 20], [80, 80, 30, 30]],
            },
            {
                "image": "102",
                "label": "brain",
                "location": "center",
                "modality": "MRI",
                "question": "Where is the brain?",
                "gt_tokens": [],
                "bbox": [[150, 90, 40, 40]],
            },
            {
                "image": "103",
                "label": "heart",
                "location": "center",
                "modality": "X-ray",
                "question": "Where is the heart?",
                "gt_tokens": [],
                "bbox": [[20, 30, 0, 10]],
            },
        ],
        "attribute": [
            {
                "image": "104",
                "label": "kidney",
                "location": "right",
                "modality": "CT",
                "question": "What colour is the kidney?",
                "gt_tokens": [],
                "bbox": [[40, 40, 20, 20]],
            },
            {
                "image": "102",
                "label": "brain",
                "location": "center",
                "modality": "MRI",
                "question": "Is the brain abnormal?",
                "gt_tokens": [],
                "bbox": [[60, 30, 40, 40]],
            },
        ],
    }
    for kind, items in rows.items():
        with open(root / f"VGMED_{kind}_questions.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in items)
    return root


def write_coco(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, img_id in enumerate((139, 285)):
        _image(root / "val2014" / f"COCO_val2014_{img_id:012d}.jpg", 140, 110, 10 + i)
    for kind in ("localization", "attribute"):
        rows = [
            {
                "image": "139",
                "label": "dog",
                "location": "left",
                "modality": "natural",
                "question": "Where is the dog?",
                "gt_tokens": [],
                "bbox": [[5, 5, 40, 50]],
            },
            {
                "image": "285",
                "label": "bear",
                "location": "center",
                "modality": "natural",
                "question": "Where is the bear?",
                "gt_tokens": [],
                "bbox": [[50, 30, 60, 60]],
            },
        ]
        with open(root / f"COCO_{kind}_questions.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def write_vgmed_current(root: Path) -> Path:
    """VGMED as the authors' current code reads it (measure_attention.py): ``VGMED_{kind}.jsonl`` beside the images.

    ``image`` is a file name under the folder; boxes sit in ``bbox`` (or ``original_bboxes``), xyxy,
    except on images whose names start with ``Slake`` (xywh).
    """
    root.mkdir(parents=True, exist_ok=True)
    _image(root / "Slake_xmlab101.jpg", 120, 120, 0)
    _image(root / "BraTS2021_00012_slice77.png", 160, 100, 1)
    _image(root / "KiTS19_case3_slice40.png", 90, 140, 2)
    rows = {
        "localization": [
            {"image": "Slake_xmlab101.jpg", "question": "Where is the liver?", "label": "liver", "bbox": [[10, 20, 30, 40]]},
            {"image": "BraTS2021_00012_slice77.png", "question": "Where is the tumour?", "label": "tumor", "bbox": [[40, 10, 100, 60]]},
            {
                "image": "KiTS19_case3_slice40.png",
                "question": "Where is the kidney?",
                "label": "kidney",
                "original_bboxes": [[5, 50, 45, 90], [50, 60, 80, 120]],
            },
        ],
        "attribute": [
            {"image": "BraTS2021_00012_slice77.png", "question": "Is the tumour enhancing?", "label": "yes", "bbox": [[40, 10, 100, 60]]},
        ],
    }
    for kind, items in rows.items():
        with open(root / f"VGMED_{kind}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in items)
    return root


def write_coco_current(images: Path, annotations: Path) -> tuple[Path, Path]:
    """The COCO control as the authors' current code reads it: ``COCO_{kind}.jsonl`` in its own folder, images by file name, xywh."""
    annotations.mkdir(parents=True, exist_ok=True)
    _image(images / "COCO_val2014_000000000139.jpg", 140, 110, 10)
    for kind in ("localization", "attribute"):
        row = {"image": "COCO_val2014_000000000139.jpg", "question": "Where is the dog?", "label": "dog", "bbox": [[5, 5, 40, 50]]}
        (annotations / f"COCO_{kind}.jsonl").write_text(json.dumps(row) + "\n")
    return images, annotations
