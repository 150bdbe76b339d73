"""The main job on the embedded default: lmms-eval with the bundled model, baseline, VGRefine and the other methods, then the report.

    lmms-vg demo --out lmms_vg_demo

Runs offline on the bundled demo model and data, in one lmms-eval process (its ``--config`` list):
the grounding task (and its random-box control) and the multiple-choice task, each in the source
domain and the shifted one, for ``lmms_vg_demo`` and ``lmms_vg_demo_vgrefine``; the multiple-choice
tasks for the PAI, AdaptVis and ViCrop ids; then writes the leaderboard (a column per domain, a
method - baseline row each), the grounding table, the layer curves (source vs shifted), the
heatmaps of each domain and the sample browser (``report/browser/index.html``) under ``<out>/report``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .. import report, writing
from ..browse import browse

GROUNDING = "vgmed_demo,vgmed_demo_random,vgmed_demo_shifted"
VQA = "medvqa_demo,medvqa_demo_shifted"
MODELS = ("lmms_vg_demo", "lmms_vg_demo_vgrefine")  # grounding and VQA; the heatmaps compare these two
METHOD_MODELS = {  # VQA; ViCrop's layer: the demo model has 4 text layers (its published 14 and 22 are for 7B models)
    "lmms_vg_demo_pai": "",
    "lmms_vg_demo_adaptvis": "",
    "lmms_vg_demo_vicrop": ",layer=2",
}


def runs(out: Path, device: str) -> list[dict]:
    """The demo's lmms-eval runs, as entries of its ``--config`` list."""
    entries = []
    for model in (*MODELS, *METHOD_MODELS):
        args = f"device={device}" + (f",save_maps={out / 'maps' / model}" if model in MODELS else METHOD_MODELS[model])
        tasks = f"{GROUNDING},{VQA}" if model in MODELS else VQA
        entries.append(
            {
                "model": model,
                "model_args": args,
                "tasks": tasks,
                "batch_size": 8,
                "output_path": str(out / "results" / model),
                "log_samples": True,
            }
        )
    return entries


def run_lmms_eval(out: Path, device: str) -> list[Path]:
    """All runs in one lmms-eval process (it is imported once); each run's results file, or an error with the log's tail.

    lmms-eval exits 0 even when a run fails, so every run's results file and tasks are checked.
    """
    entries = runs(out, device)
    workdir = out / "work"  # empty: lmms-eval reads --tasks X as a folder when ./X exists
    workdir.mkdir(parents=True, exist_ok=True)
    config = out / "demo_runs.json"  # JSON is YAML: lmms-eval's --config reads it
    config.write_text(json.dumps(entries, indent=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = out / "lmms_eval.log"
    with open(log, "w") as fh:
        cmd = [sys.executable, "-m", "lmms_eval", "--config", str(config)]
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    tail = log.read_text()[-3000:]
    found = []
    for entry in entries:
        files = sorted(Path(entry["output_path"]).rglob("*_results.json"))
        if not files:
            raise RuntimeError(
                f"lmms-eval wrote no results for {entry['model']} (exit {proc.returncode}); its log ({log}) ends with:\n{tail}"
            )
        done = json.loads(files[-1].read_text()).get("results", {})
        missing = [t for t in entry["tasks"].split(",") if t not in done]
        if missing:
            raise RuntimeError(f"lmms-eval's results for {entry['model']} lack {missing}; its log ({log}) ends with:\n{tail}")
        found.append(files[-1])
    return found


# what the demo writes under its folder; a run again replaces its own earlier files there, never the user's
WRITES = ["results", "maps", "report", "work", "demo_runs.json", "lmms_eval.log"]


def run_demo(out: Path, device: str = "cpu", force: bool = False) -> list[Path]:
    out = out.resolve()
    t0 = time.time()
    # a run again into the same folder must never report the last run's results: its own earlier files go first
    writing.clear_own(out, WRITES, force, what="lmms-vg demo")
    results = run_lmms_eval(out, device)
    for path in results:
        print(f"{path.parent.parent.name}: {path}")
    print(f"lmms-eval runs done ({time.time() - t0:.0f}s)")
    writing.record(out, writing.files_under(out, [w for w in WRITES if w != "report"]), by="lmms-vg demo")
    runs = report.load_runs([out / "results"])
    target = out / "report"
    panels = {"baseline": out / "maps" / MODELS[0], "VGRefine": out / "maps" / MODELS[1]}
    with writing.staged(target, force, what="lmms-vg demo") as stage:
        written = report.write_leaderboards(runs, stage)
        written += report.layer_curves(runs, stage)
        written += report.heatmaps(panels, stage, pattern="vgmed_demo_[0-9]*")
        # the shifted domain's figure shows the question's own attention: the disc's share of it, and the knockout removing it
        written += report.heatmaps(panels, stage, pattern="vgmed_demo_shifted_*", stem="heatmaps_shifted", normalised=False)
        written = writing.in_place(written, stage, target)
    written += browse([out / "results"], target / "browser", force=force)[:1]  # every sample, runs side by side
    writing.record(out, written, by="lmms-vg demo")
    print(f"demo done in {time.time() - t0:.0f}s; report in {target}")
    return written
