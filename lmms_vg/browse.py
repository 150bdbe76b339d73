"""``lmms-vg browse``: a static browser over lmms-eval output folders, one card per item, runs side by side.

The bundle opens from disk (``file://``, no server, no network): ``index.html`` with the app inline,
``data.js`` (every item, every run's answer and outcome, the grounding metrics at each run's best layer),
``chunks/`` (per item: the prompt, per-layer AR/KL/JS, the maps' sprite and boxes), ``thumbs/`` (each
image once, downscaled) and ``maps/`` (per item and run, the per-layer attention grids as one palette
PNG, 16 levels, drawn by the browser over the image). Everything is loaded by ``<script>`` and
``<img>``, never ``fetch``, so a browser opens it from disk; served as static files it works as is.

Items are keyed by task and doc id; runs of one task on different item sets are shown as separate
tasks (the item set named), never joined. An item whose image is missing still gets a card that
says so; a run without sample logs is named with what to rerun (``--log_samples``), and grounding
maps need the run's ``save_maps=``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from . import keys, report, writing

THUMB = 256  # px, the longest side of a card's image
LEVELS = 16  # a map cell's shades (4-bit palette PNG)
CHUNK = 100  # items per lazily loaded chunk file


class BrowseError(ValueError):
    """Folders the browser cannot be built from; the message says what to rerun."""


@dataclass
class Item:
    task: str  # the task key (task, or "task [item set]" where runs differ in item set)
    doc_id: int
    question: str = ""
    category: str = ""
    image: str | None = None  # the thumbnail's path in the bundle
    image_missing: str | None = None  # why there is no image
    outcomes: dict[int, dict] = field(default_factory=dict)  # run index -> answer, correct, metrics at its best layer
    detail: dict[int, dict] = field(default_factory=dict)  # run index -> per-layer metrics, map sprite, boxes (chunk data)


def browse(folders: list[str | Path], out: str | Path, force: bool = False) -> list[Path]:
    """Write the browser for the runs under ``folders`` into ``out``; the files written (``index.html`` first)."""
    runs = sorted(report.load_runs(folders), key=lambda r: r.order)
    without = [r.label for r in runs if not any(r.sample_lines(t) is not None for t in r.results)]
    if len(without) == len(runs):
        raise BrowseError(
            f"no per-sample logs under {', '.join(map(str, folders))}: rerun lmms-eval with --log_samples "
            "(and save_maps=<folder> in --model_args for the attention maps)"
        )
    with writing.staged(Path(out), force, what="lmms-vg browse") as stage:
        builder = Builder(stage)
        items = builder.collect(runs)
        written = builder.write(runs, items, notes=[f"{label}: no sample logs (rerun with --log_samples)" for label in without])
        return writing.in_place(written, stage, Path(out))


class Builder:
    def __init__(self, root: Path):
        self.root = root
        self.thumbs: dict[str, str | None] = {}  # source image -> thumbnail path in the bundle
        self.written: list[Path] = []

    # ------------------------------------------------------------ reading the runs
    def collect(self, runs: list[report.Run]) -> dict[tuple[str, int], Item]:
        item_sets = {}
        for run in runs:
            for task in run.results:
                counts = run.results[task].get(keys.key(keys.SAMPLES)) or {}
                item_sets.setdefault(task, set()).add(counts.get("item_set", "") if isinstance(counts, dict) else "")
        items: dict[tuple[str, int], Item] = {}
        for index, run in enumerate(runs):
            for task in sorted(run.results):
                lines = run.sample_lines(task)
                if lines is None:
                    continue
                counts = run.results[task].get(keys.key(keys.SAMPLES)) or {}
                item_set = counts.get("item_set", "") if isinstance(counts, dict) else ""
                name = f"{task} [{item_set or 'unnamed item set'}]" if len(item_sets[task]) > 1 else task
                for line in lines:
                    key = (name, int(line["doc_id"]))
                    item = items.setdefault(key, Item(name, int(line["doc_id"])))
                    self._read(item, index, run, task, line)
        return items

    def _read(self, item: Item, index: int, run: report.Run, task: str, line: dict) -> None:
        closed = line.get(keys.ACCURACY)
        grounding = line.get(keys.GROUNDING_METRICS[0])
        item.question = item.question or str(line.get("input") or "")
        if isinstance(closed, dict):
            item.category = item.category or str(closed.get("category") or "")
            correct = None if closed.get("excluded") else bool(closed.get("correct"))
            item.outcomes[index] = {
                "answer": str(closed.get("output", "")),
                "pred": closed.get("pred"),
                "gold": closed.get("gold"),
                "correct": correct,
            }
            if closed.get("excluded"):
                item.outcomes[index]["excluded"] = str(closed["excluded"])
        elif isinstance(grounding, dict):
            self._read_grounding(item, index, run, task, grounding)
        if item.image is None and item.image_missing is None:
            self._thumbnail(item, line.get("input_media") or [])

    def _read_grounding(self, item: Item, index: int, run: report.Run, task: str, record: dict) -> None:
        if record.get("skipped"):
            item.outcomes[index] = {"skipped": str(record["skipped"])}
            return
        kl = np.array([np.nan if v is None else v for v in record.get("kl") or []], dtype=float)
        best = int(np.nanargmin(kl)) if kl.size and not np.isnan(kl).all() else None
        at = {m: (record.get(m) or [None])[best] if best is not None else None for m in ("ar", "kl", "js")}
        item.outcomes[index] = {"best_layer": best, **at}
        detail = {m: record.get(m) for m in ("ar", "kl", "js")}
        npz = self._maps_file(run, task, item.doc_id)
        if npz is not None:
            detail.update(self._maps(npz, item, index))
        item.detail[index] = detail

    def _maps_file(self, run: report.Run, task: str, doc_id: int) -> Path | None:
        record = report.run_record(run.results)
        folder = Path(record.maps) if record is not None and record.maps else None
        found = folder / f"{task}_{doc_id}.npz" if folder else None
        return found if found is not None and found.exists() else None

    def _maps(self, path: Path, item: Item, index: int) -> dict:
        """The sample's maps as sprites (normalised and the question's own), its boxes and kept patches; its image if the card
        has none yet."""
        with np.load(path) as z:
            saved = {k: z[k] for k in z.files}
        rows, cols = (int(v) for v in saved["grid"])
        found = {"grid": [rows, cols], "layers": int(saved["maps"].shape[0])}
        for field_name, label in (("maps", "normalised"), ("question_maps", "raw")):
            if field_name in saved:
                found[label] = self._sprite(saved[field_name].astype(np.float32), rows, cols, f"{item.task}_{item.doc_id}_{index}_{label}")
        found["transform"] = [round(float(v), 6) for v in saved["transform"]]
        found["boxes"] = saved["boxes"].round(1).tolist()
        found["image_size"] = saved["image_size"].tolist()
        if saved.get("kept") is not None and saved["kept"].size:
            found["kept"] = "".join("1" if k else "0" for k in saved["kept"].tolist())
        if item.image is None:
            item.image = self._save_thumb(Image.fromarray(saved["image"]), f"npz:{path}")
            item.image_missing = None
        return found

    def _sprite(self, maps: np.ndarray, rows: int, cols: int, name: str) -> str:
        """Every layer's grid side by side in one palette PNG (16 shades of a heat ramp, transparent at 0)."""
        peak = np.maximum(maps.max(axis=1, keepdims=True), 1e-12)
        levels = np.clip(np.rint(maps / peak * (LEVELS - 1)), 0, LEVELS - 1).astype(np.uint8)
        strip = levels.reshape(-1, rows, cols).transpose(1, 0, 2).reshape(rows, -1)  # layer l at columns l*cols..
        image = Image.fromarray(strip, mode="P")
        ramp = [(255, int(255 * (1 - t)), 0) for t in np.linspace(0, 1, LEVELS)]  # yellow to red
        image.putpalette([c for rgb in ramp for c in rgb])
        image.info["transparency"] = bytes(int(200 * t) for t in np.linspace(0, 1, LEVELS))  # faint where attention is low
        target = self.root / "maps" / f"{_safe(name)}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, optimize=True, transparency=image.info["transparency"])
        self.written.append(target)
        return f"maps/{target.name}"

    def _thumbnail(self, item: Item, media: list) -> None:
        if not media:
            item.image_missing = "the sample log names no image file (the task loads images in memory)"
            return
        source = str(media[0])
        if source not in self.thumbs:
            try:
                with Image.open(source) as opened:
                    self.thumbs[source] = self._save_thumb(opened, source)
            except OSError as err:
                self.thumbs[source] = None
                item.image_missing = f"image missing: {source} ({type(err).__name__})"
                return
        item.image = self.thumbs[source]
        if item.image is None:
            item.image_missing = f"image missing: {source}"

    def _save_thumb(self, image: Image.Image, key: str) -> str:
        from .adapters import rgb
        from .files import upright

        picture = rgb(upright(image))
        picture.thumbnail((THUMB, THUMB))
        target = self.root / "thumbs" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=85)
        self.written.append(target)
        return f"thumbs/{target.name}"

    # ------------------------------------------------------------ writing the bundle
    def write(self, runs: list[report.Run], items: dict[tuple[str, int], Item], notes: list[str]) -> list[Path]:
        ordered = sorted(items.values(), key=lambda i: (i.task, i.doc_id))
        tasks = sorted({i.task for i in ordered})
        data = {
            "runs": [{"label": r.label, "base": r.base, "method": r.method or "baseline"} for r in runs],
            "tasks": tasks,
            "notes": notes,
            "chunk": CHUNK,
            # per item: task, doc id, question, category, image (or why none), and per run its outcome
            "items": [
                [
                    tasks.index(i.task),
                    i.doc_id,
                    i.question,
                    i.category,
                    i.image,
                    i.image_missing,
                    {str(k): v for k, v in i.outcomes.items()},
                ]
                for i in ordered
            ],
        }
        self._write_js("data.js", "window.LMMS_VG_DATA = ", data)
        for start in range(0, len(ordered), CHUNK):
            chunk = {str(start + n): {str(k): v for k, v in item.detail.items()} for n, item in enumerate(ordered[start : start + CHUNK])}
            self._write_js(f"chunks/c{start // CHUNK:05d}.js", f"window.LMMS_VG_CHUNK({start // CHUNK}, ", chunk, ");")
        app = resources.files("lmms_vg").joinpath("browser")
        html = app.joinpath("index.html").read_text(encoding="utf-8")
        html = html.replace("/*STYLE*/", app.joinpath("style.css").read_text(encoding="utf-8"))
        html = html.replace("/*APP*/", app.joinpath("app.js").read_text(encoding="utf-8"))
        index = self.root / "index.html"
        index.write_text(html, encoding="utf-8")
        return [index, *self.written]

    def _write_js(self, name: str, head: str, value, tail: str = ";") -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(value, separators=(",", ":"), default=_plain).replace("</", "<\\/")
        target.write_text(head + text + tail + "\n", encoding="utf-8")
        self.written.append(target)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
