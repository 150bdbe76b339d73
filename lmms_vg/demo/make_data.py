"""Write the bundled demo data: synthetic scenes with grounding questions (boxes) and multiple-choice VQA.

python -m lmms_vg.demo.make_data          # writes lmms_vg/demo/data/ (seeded, deterministic)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lmms_vg.demo import synthetic

DATA_DIR = Path(__file__).parent / "data"


def write(out: Path, n_images: int = 24, seed: int = 1234) -> None:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    grounding, vqa = [], []
    for i in range(n_images):
        image, things = synthetic.scene(rng)
        name = f"images/scene_{i:03d}.png"
        image.save(out / name)
        for _ in range(2):
            q = synthetic.question(things, rng)
            grounding.append({"image": name, "question": q.question, "answer": q.answer, "kind": q.kind, "bbox": list(q.target.box)})
            q = synthetic.question(things, rng)
            vqa.append({"image": name, "question": q.question, "options": synthetic.options_for(q), "answer": q.answer, "kind": q.kind})
    for fname, rows in (("grounding.jsonl", grounding), ("vqa.jsonl", vqa)):
        with open(out / fname, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(DATA_DIR))
    write(Path(p.parse_args().out))


if __name__ == "__main__":
    main()
