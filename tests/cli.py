"""Run the real lmms-eval CLI in a subprocess and read its results file (the CLI exits 0 even on failure)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Random-weight models never stop early: where the protocol's 256 new tokens are not what a test is about,
# it asks for a few (test_medvqa_group_through_cli checks the protocol's own setting).
FEW_TOKENS = ["--gen_kwargs", "max_new_tokens=8"]


def run_lmms_eval(
    tmp_path: Path, model: str, model_args: str, tasks: str, env: dict | None = None, extra: list[str] | None = None, processes: int = 1
) -> tuple[dict, Path]:
    """One lmms-eval run; its results and their folder.

    ``processes`` > 1: data parallel on CPU. ``accelerate launch`` starts CPU workers only through MPI,
    so the workers come from torchrun and accelerate joins them (ACCELERATE_USE_CPU=true, gloo).
    """
    if os.environ.get("LMMS_VG_MUTATION"):
        pytest.skip("mutation testing: mutmut's mutants live in this process, not in an lmms-eval subprocess")
    out = tmp_path / "results"
    launcher = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29561",
            "-m",
            "lmms_eval",
        ]
        env = {**(env or {}), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        *launcher,
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--output_path",
        str(out),
        "--log_samples",
        "--batch_size",
        "2",
        *(extra or []),
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cwd = tmp_path / "cwd"  # empty: lmms-eval reads --tasks X as a folder when ./X exists
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600, check=False)
    found = sorted(out.rglob("*_results.json"))
    assert found, f"lmms-eval wrote no results file (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(found[-1].read_text()), found[-1].parent
