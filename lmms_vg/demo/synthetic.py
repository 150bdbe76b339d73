"""Synthetic scenes: coloured shapes at random places, with grounding and VQA questions about one of them.

Everything is drawn from a seeded generator, so the demo data and the training stream are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 112  # 8x8 patches of 14 px
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
SHAPES = ("square", "circle", "triangle")
SHORT = " Answer the question using a single word or phrase."


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
        fill = COLORS[t.color]
        if t.shape == "square":
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif t.shape == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return img


CELL = 28  # a 4x4 layout of 28 px cells: each thing covers one cell's 2x2 patches, left/right is never ambiguous


def scene(rng: random.Random) -> tuple[Image.Image, list[Thing]]:
    """2 or 3 things of different shapes and colours, each in its own cell of a 4x4 layout."""
    n = rng.choice((2, 3))
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    cells = rng.sample(range(16), n)
    things = []
    for shape, color, cell in zip(shapes, colors, cells):
        size = rng.randint(20, 26)
        x = (cell % 4) * CELL + rng.randint(0, CELL - size)
        y = (cell // 4) * CELL + rng.randint(0, CELL - size)
        things.append(Thing(shape, color, (x, y, x + size, y + size)))
    return draw(things, rng), things


def question(things: list[Thing], rng: random.Random) -> Question:
    t = rng.choice(things)
    kind = rng.choice(("localization", "attribute"))
    if kind == "localization":
        side = "left" if (t.box[0] + t.box[2]) / 2 < SIZE / 2 else "right"
        if rng.random() < 0.5:
            return Question(f"Is the {t.shape} on the left or the right?", side, t, kind)
        return Question(f"Is the {t.color} shape on the left or the right?", side, t, kind)
    if rng.random() < 0.5:
        return Question(f"What color is the {t.shape}?", t.color, t, kind)
    return Question(f"What shape is {t.color}?", t.shape, t, kind)


def options_for(q: Question, rng: random.Random) -> list[str]:
    pool = {"left": ["left", "right"], "right": ["left", "right"]}.get(q.answer) or (list(COLORS) if q.answer in COLORS else list(SHAPES))
    opts = list(pool)
    rng.shuffle(opts)
    return opts
