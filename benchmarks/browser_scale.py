"""The sample browser at the paper's sizes: 10,000 items x 3 runs, its size on disk and its speed in headless Chromium.

    .venv/bin/python benchmarks/browser_scale.py                       # 10,000 items, 3 runs, HuatuoGPT-7B's 24 x 24 grid, 28 layers
    .venv/bin/python benchmarks/browser_scale.py --items 2000 --grid 8 --layers 4

Writes synthetic lmms-eval output folders (a VQA task and a grounding task with saved maps, as the
runs write them: sample logs, results files, .npz maps; half the items each), builds the browser with
``lmms-vg browse``, and prints the time to build it, its size on disk (per kind of file), and, in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``), the time from opening
``index.html`` to the first card and the time to apply a filter, each the median of 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def run_record(label: str, method: str | None, maps: Path) -> dict:
    return {
        "model": "huatuo",
        "checkpoint": "x",
        "method": method,
        "settings": {},
        "default_checkpoint": True,
        "layers": [16],
        "maps": str(maps),
    }


def write_runs(root: Path, items: int, grid: int, layers: int, images: int) -> list[Path]:
    """Three runs (baseline, VGRefine, PAI): sample logs and results of a VQA and a grounding task, the grounding maps saved."""
    rng = np.random.default_rng(0)
    pictures = root / "images"
    pictures.mkdir(parents=True)
    for n in range(images):  # smooth scans-like images, each used by several items
        y, x = np.mgrid[0:512, 0:512]
        arr = (127 + 100 * np.sin(x / (20 + n % 7)) * np.cos(y / (15 + n % 5))).astype(np.uint8)
        Image.fromarray(np.stack([arr] * 3, -1)).save(pictures / f"scan_{n}.png")
    half = items // 2
    folders = []
    for label, method in (("huatuo", None), ("huatuo_vgrefine", "vgrefine"), ("huatuo_pai", "pai")):
        folder, maps = root / "results" / label, root / "maps" / label
        folder.mkdir(parents=True)
        maps.mkdir(parents=True)
        record = run_record(label, method, maps)
        vqa, ground = [], []
        for doc in range(half):
            right = bool(rng.random() < 0.6)
            closed = {
                "id": f"q{doc}",
                "benchmark": "vqa_rad",
                "category": ["CT", "MRI", "X-ray"][doc % 3],
                "output": "A" if right else "B",
                "correct": right,
                "excluded": None,
                "pred": "A" if right else "B",
                "gold": "A",
                "run": record,
            }
            vqa.append(
                {
                    "doc_id": doc,
                    "input": f"Question {doc}: is there a lesion in region {doc % 17}?\nA. yes\nB. no",
                    "input_media": [str(pictures / f"scan_{doc % images}.png")],
                    "accuracy": closed,
                    "samples": closed,
                }
            )
        for doc in range(items - half):
            kl = rng.random(layers) * 3
            g = {
                "ar": (rng.random(layers) * 3).tolist(),
                "kl": kl.tolist(),
                "js": (rng.random(layers) * 0.7).tolist(),
                "skipped": None,
                "run": record,
            }
            ground.append({"doc_id": doc, "input": f"Where is the lesion in scan {doc}?", "kl_by_layer": g, "ar_by_layer": g, "samples": g})
            thumb = np.asarray(Image.open(pictures / f"scan_{doc % images}.png").resize((336, 336)))
            np.savez_compressed(
                maps / f"vgmed_loc_{doc}.npz",
                maps=rng.random((layers, grid * grid)).astype(np.float16),
                question_maps=rng.random((layers, grid * grid)).astype(np.float16),
                box=np.zeros(grid * grid, bool),
                grid=np.array([grid, grid]),
                transform=np.array([336 / 512, 336 / 512, 0.0, 0.0, 336 / grid, 336 / grid]),
                image=thumb,
                image_size=np.array([512, 512]),
                boxes=np.array([[100.0, 120.0, 260.0, 300.0]]),
                question=np.array(f"Where is the lesion in scan {doc}?"),
                knockout_layers=np.array([16]),
                kept=rng.random(grid * grid) > 0.5 if method == "vgrefine" else np.zeros(0, bool),
            )
        stamp = "20261201_000000"
        results = {
            "results": {
                "vqa_rad": {"accuracy,none": 60.0, "samples,none": {"scored": half, "item_set": "paper", "run": record}},
                "vgmed_loc": {
                    "kl_by_layer,none": [1.0] * layers,
                    "best_layer,none": {"layer": 0},
                    "samples,none": {"scored": items - half, "run": record},
                },
            },
            "config": {"model": label},
            "n-samples": {
                "vqa_rad": {"original": half, "effective": half},
                "vgmed_loc": {"original": items - half, "effective": items - half},
            },
        }
        (folder / f"{stamp}_results.json").write_text(json.dumps(results))
        (folder / f"{stamp}_samples_vqa_rad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in vqa))
        (folder / f"{stamp}_samples_vgmed_loc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ground))
        folders.append(folder)
    return folders


def sizes(bundle: Path) -> dict[str, int]:
    found = {}
    for path in bundle.rglob("*"):
        if path.is_file():
            kind = path.relative_to(bundle).parts[0] if len(path.relative_to(bundle).parts) > 1 else path.name
            found[kind] = found.get(kind, 0) + path.stat().st_size
    return found


def in_chromium(index: Path, repeats: int = 3) -> tuple[float, float]:
    """Median milliseconds from opening the page to its first card, and to apply a filter (task and outcome)."""
    from selenium import webdriver
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    first, filtering = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            driver.get(index.as_uri())
            WebDriverWait(driver, 120).until(lambda d: d.find_elements("css selector", ".card"))
            first.append(1000 * (time.perf_counter() - t0))
            Select(driver.find_element("id", "task")).select_by_visible_text("vqa_rad")
            Select(driver.find_element("id", "outcome")).select_by_visible_text("A wrong, B right")
            filtering.append(driver.execute_script("return window.LMMS_VG_TIMES.apply"))
    finally:
        driver.quit()
    return statistics.median(first), statistics.median(filtering)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--grid", type=int, default=24, help="token grid side (HuatuoGPT-Vision-7B: 24)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--images", type=int, default=1000, help="distinct images (items share them, as benchmarks' questions do)")
    args = parser.parse_args()
    from lmms_vg.browse import browse

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        t0 = time.perf_counter()
        folders = write_runs(root, args.items, args.grid, args.layers, args.images)
        print(
            f"{args.items:,} items x 3 runs (half VQA, half grounding with {args.grid}x{args.grid} maps, {args.layers} layers): "
            f"inputs written in {time.perf_counter() - t0:.0f}s"
        )
        t0 = time.perf_counter()
        browse(folders, root / "browser")
        print(f"lmms-vg browse: {time.perf_counter() - t0:.0f}s")
        found = sizes(root / "browser")
        total = sum(found.values())
        print(f"bundle on disk: {total / 2**20:.1f} MiB (" + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(found.items())) + ")")
        if shutil.which("chromedriver"):
            first, filtering = in_chromium(root / "browser" / "index.html")
            print(f"headless Chromium: first card {first:.0f} ms after opening; a filter (task + outcome) applied in {filtering:.0f} ms")
        else:
            print("headless Chromium: not installed (apt-get install chromium chromium-driver)")


if __name__ == "__main__":
    main()
