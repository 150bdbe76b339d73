"""The main job on the embedded default: lmms-eval with the bundled model, baseline and VGRefine, then the report.

    lmms-vg demo --out lmms_vg_demo

Runs offline on the bundled demo model and data: the grounding task (and its random-box control)
and the multiple-choice task, for ``lmms_vg_demo`` and ``lmms_vg_demo_vgrefine``; then writes the
leaderboard, the grounding table, the layer curves and the heatmaps under ``<out>/report``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import report

TASKS = "vgmed_demo,vgmed_demo_random,medvqa_demo"
MODELS = ("lmms_vg_demo", "lmms_vg_demo_vgrefine")


def run_lmms_eval(model: str, out: Path, device: str) -> Path:
    """One lmms-eval run; its results file, or an error with the log's tail (the CLI exits 0 on failure)."""
    results = out / "results" / model
    maps = out / "maps" / model
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        model,
        "--model_args",
        f"device={device},save_maps={maps}",
        "--tasks",
        TASKS,
        "--batch_size",
        "8",
        "--output_path",
        str(results),
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    workdir = out / "work"  # empty: lmms-eval reads --tasks X as a folder when ./X exists
    workdir.mkdir(parents=True, exist_ok=True)
    for previous in (results, maps):  # a run again into the same folder must never report the last run's results
        shutil.rmtree(previous, ignore_errors=True)
    log = out / f"{model}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    found = sorted(results.rglob("*_results.json"))
    tail = log.read_text()[-3000:]
    if not found:
        raise RuntimeError(f"lmms-eval wrote no results for {model} (exit {proc.returncode}); its log ({log}) ends with:\n{tail}")
    done = json.loads(found[-1].read_text()).get("results", {})
    missing = [t for t in TASKS.split(",") if t not in done]
    if missing:
        raise RuntimeError(f"lmms-eval's results for {model} lack {missing}; its log ({log}) ends with:\n{tail}")
    return found[-1]


def run_demo(out: Path, device: str = "cpu") -> list[Path]:
    out = out.resolve()
    t0 = time.time()
    for model in MODELS:
        path = run_lmms_eval(model, out, device)
        print(f"{model}: {path} ({time.time() - t0:.0f}s)")
    runs = report.load_runs([out / "results"])
    target = out / "report"
    shutil.rmtree(target, ignore_errors=True)
    written = report.write_leaderboards(runs, target)
    written += report.layer_curves(runs, target)
    written += report.heatmaps(
        {"baseline": out / "maps" / MODELS[0], "VGRefine": out / "maps" / MODELS[1]}, target, pattern="vgmed_demo_[0-9]*"
    )
    print(f"demo done in {time.time() - t0:.0f}s; report in {target}")
    return written
