"""Run the real lmms-eval CLI in a subprocess and read its results file (the CLI exits 0 even on failure)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_lmms_eval(tmp_path: Path, model: str, model_args: str, tasks: str, env: dict | None = None, extra: list[str] | None = None) -> tuple[dict, Path]:
    out = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
        "--output_path", str(out), "--log_samples", "--batch_size", "2", *(extra or []),
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cwd = tmp_path / "cwd"  # empty: lmms-eval reads --tasks X as a folder when ./X exists
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    found = sorted(out.rglob("*_results.json"))
    assert found, f"lmms-eval wrote no results file (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(found[-1].read_text()), found[-1].parent
