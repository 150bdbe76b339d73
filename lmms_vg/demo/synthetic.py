"""Synthetic scenes: a coloured shape among grey ones, with grounding and VQA questions about it.

Everything is drawn from a seeded generator, so the demo data and the training stream are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 112  # 8x8 patches of 14 px
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
SHAPES = ("square", "circle", "triangle")


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # xyxy pixels


@dataclass(frozen=True)
class Question:
    question: str  # without the answer instruction
    answer: str
    target: Thing
    kind: str  # localization or attribute


def draw(things: list[Thing], rng: random.Random) -> Image.Image:
    grey = rng.randint(20, 60)
    img = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    for t in things:
        x0, y0, x1, y1 = t.box
        fill = COLORS[t.color] if t.color in COLORS else (int(t.color[4:]),) * 3  # "grey<level>" distractors
        if t.shape == "square":
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif t.shape == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return img


CELL = 28  # a 4x4 layout of 28 px cells: each thing covers one cell's 2x2 patches, left/right is never ambiguous


def scene(rng: random.Random, distractors: bool = True) -> tuple[Image.Image, list[Thing]]:
    """One coloured target and 1-2 grey distractors of other shapes, each in its own cell of a 4x4 layout.

    The target comes first. Questions are about the coloured shape, so answering needs the model to
    find it among the distractors: its attention has a right place to be.
    """
    n = rng.choice((2, 3)) if distractors else 1
    shapes = rng.sample(SHAPES, n)
    cells = rng.sample(range(16), n)
    things = []
    for i, (shape, cell) in enumerate(zip(shapes, cells)):
        size = rng.randint(20, 26)
        x = (cell % 4) * CELL + rng.randint(0, CELL - size)
        y = (cell // 4) * CELL + rng.randint(0, CELL - size)
        color = rng.choice(list(COLORS)) if i == 0 else f"grey{rng.randint(110, 200)}"
        things.append(Thing(shape, color, (x, y, x + size, y + size)))
    return draw(things, rng), things


def question(things: list[Thing], rng: random.Random, kinds: tuple[str, ...] = ("color", "side", "shape")) -> Question:
    """A localization (side) or attribute (color, shape) question about the coloured target."""
    t = things[0]
    side = "left" if (t.box[0] + t.box[2]) / 2 < SIZE / 2 else "right"
    asked = {
        "side": ("localization", "Is the colored shape on the left or the right?", side),
        "color": ("attribute", "What color is the colored shape?", t.color),
        "shape": ("attribute", "What shape is colored?", t.shape),
    }
    kind, text, answer = asked[rng.choice(kinds)]
    return Question(text, answer, t, kind)


def options_for(q: Question) -> list[str]:
    """The options of a multiple-choice item, always in one order per question kind.

    The prompt and the scoring are the medical protocol's; only the order is fixed, so that the
    letter follows from the answer (a shuffled order adds a matching step this small a model does
    not learn in minutes on a CPU).
    """
    if q.answer in ("left", "right"):
        return ["left", "right"]
    return list(COLORS) if q.answer in COLORS else list(SHAPES)
