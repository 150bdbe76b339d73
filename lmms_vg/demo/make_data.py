"""Write the bundled demo data: synthetic scenes with grounding questions (boxes) and multiple-choice VQA, in two domains.

python -m lmms_vg.demo.make_data          # writes lmms_vg/demo/data/ (seeded, deterministic)

The shifted domain holds the same scenes and questions, each image with the shift drawn in
(:func:`synthetic.shifted`, from a generator of its own), so the two domains compare item by item.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lmms_vg.demo import synthetic

DATA_DIR = Path(__file__).parent / "data"


def write(out: Path, n_images: int = 48, seed: int = 1234) -> None:
    """Per scene: two grounding questions and four multiple-choice ones, in each domain (enough items to tell a method's effect from noise)."""
    rng, shift_rng = random.Random(seed), random.Random(seed + 1)
    (out / "images").mkdir(parents=True, exist_ok=True)
    grounding, vqa = [], []
    for i in range(n_images):
        image, things = synthetic.scene(rng)
        name = f"images/scene_{i:03d}.png"
        image.save(out / name)
        synthetic.shifted(image, things, shift_rng).save(out / shifted_name(name))
        for _ in range(2):
            q = synthetic.question(things, rng)
            grounding.append({"image": name, "question": q.question, "answer": q.answer, "kind": q.kind, "bbox": list(q.target.box)})
        for _ in range(4):
            q = synthetic.question(things, rng)
            vqa.append({"image": name, "question": q.question, "options": synthetic.options_for(q), "answer": q.answer, "kind": q.kind})
    shifted = [[{**r, "image": shifted_name(r["image"])} for r in rows] for rows in (grounding, vqa)]
    files = {"grounding.jsonl": grounding, "vqa.jsonl": vqa, "grounding_shifted.jsonl": shifted[0], "vqa_shifted.jsonl": shifted[1]}
    for fname, rows in files.items():
        with open(out / fname, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def shifted_name(name: str) -> str:
    return name.replace("scene_", "shifted_")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(DATA_DIR))
    write(Path(p.parse_args().out))


if __name__ == "__main__":
    main()
