"""The wheel: lmms-vg's own top-level packages only, with the task YAMLs and bundled data; entry point and task path."""

import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    """A wheel built from a copy of the checkout after README's main command ran in it (its lmms_vg_demo/ folder left behind).

    Built from a copy, as a release build from the source distribution is: an in-place build would
    leave build/ in the checkout, whose stale files setuptools packs into the next wheel.
    """
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(
        ROOT, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__")
    )
    (src / "lmms_vg_demo" / "report").mkdir(parents=True, exist_ok=True)  # what `lmms-vg demo --out lmms_vg_demo` leaves
    (src / "lmms_vg_demo" / "report" / "leaderboard.md").write_text("| Model |\n")
    (src / "lmms_vg_demo" / "work.py").write_text("x = 1\n")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out)
    return zipfile.ZipFile(next(out.glob("lmms_vg-*.whl"))).namelist()


def test_wheel_layout(wheel_names):
    top = Counter(n.split("/")[0] for n in wheel_names)
    assert {t for t in top if not t.endswith(".dist-info")} == {"lmms_vg", "lmms_vg_models", "lmms_vg_tasks"}
    for task in (
        "vgmed/vgmed_loc.yaml",
        "vgmed/_default_template_yaml",
        "medvqa/medvqa.yaml",
        "medvqa/_closed_yaml",
        "demo/vgmed_demo.yaml",
    ):
        assert f"lmms_vg_tasks/{task}" in wheel_names
    assert "lmms_vg/heads/huatuo_7b.json" in wheel_names and "lmms_vg/heads/demo.json" in wheel_names
    assert "lmms_vg/demo/data/grounding.jsonl" in wheel_names and any(n.startswith("lmms_vg/demo/data/images/") for n in wheel_names)
    assert "lmms_vg/demo/model/model.safetensors" in wheel_names and "lmms_vg/demo/model/config.json" in wheel_names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in wheel_names)  # safetensors only
    entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    assert entry_points


def test_task_path_is_added_once_and_can_be_turned_off():
    code = (
        "import lmms_eval.models; from lmms_eval.tasks import TaskManager; import lmms_vg_models.registry as r;"
        "r.add_task_path(); r.add_task_path(); tm = TaskManager();"
        "print('vgmed_loc' in tm.all_tasks, 'slake' in tm.all_tasks, tm.task_index['slake']['yaml_path'].startswith(r.TASKS_DIR))"
    )
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert on == ["True", "True", "False"]  # ours found; the built-in slake stays lmms-eval's
    off_code = "import lmms_eval.models; from lmms_eval.tasks import TaskManager; print('vgmed_loc' in TaskManager().all_tasks)"
    env = {**__import__("os").environ, "LMMS_VG_AUTO_TASKS": "0"}
    off = subprocess.run([sys.executable, "-c", off_code], capture_output=True, text=True, check=True, env=env).stdout.split()
    assert off == ["False"]
