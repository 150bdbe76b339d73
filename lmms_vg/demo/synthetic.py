"""Synthetic scenes: a coloured shape among grey ones, with grounding and VQA questions about it.

Two domains: the source (what the demo model is trained and its heads calibrated on) and a shifted
one (:func:`shifted`): sensor noise over the whole image, and a large salient structure that no
question is about, as a marker, a tube or a bright bone sits in a medical image. Everything is drawn from a
seeded generator, so the demo data and the training stream are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
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


SHIFT_COLOR = (220, 40, 220)  # magenta: salient, coloured, and no option's colour
SHIFT_SIZE = 27  # px: a disc filling one 28 px cell of the layout (its 2 x 2 patches)
SHIFT_NOISE = 20.0  # std of the Gaussian noise added to every pixel (grey levels, the same on the three channels)


def shifted(image: Image.Image, things: list[Thing], rng: random.Random) -> Image.Image:
    """The scene in the shifted domain: a large magenta disc in a free cell of the layout (never on a shape), then noise."""
    taken = {thing_cell(t) for t in things}
    cell = rng.choice([c for c in range(16) if c not in taken])
    x, y = (cell % 4) * CELL + 1, (cell // 4) * CELL + 1
    out = image.copy()
    ImageDraw.Draw(out).ellipse([x, y, x + SHIFT_SIZE - 1, y + SHIFT_SIZE - 1], fill=SHIFT_COLOR)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, SHIFT_NOISE, (out.height, out.width, 1))
    return Image.fromarray(np.clip(np.asarray(out, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def thing_cell(t: Thing) -> int:
    """The layout cell (0..15, row-major) a thing was placed in."""
    return (t.box[0] + t.box[2]) // 2 // CELL + 4 * ((t.box[1] + t.box[3]) // 2 // CELL)


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
