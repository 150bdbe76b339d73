"""The wheel: lmms-vg's own top-level packages only, with the task YAMLs and bundled data; entry point and task path."""

import os
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
    assert {t for t in top if not t.endswith(".dist-info")} == {"lmms_vg", "lmms_vg_models", "lmms_vg_tasks", "lmms_vg_tasks.pth"}
    assert top["lmms_vg_tasks.pth"] == 1  # a file: the start-up hook that shows the tasks in every lmms-eval listing
    for task in (
        "vgmed/vgmed_loc.yaml",
        "vgmed/_default_template_yaml",
        "medvqa/medvqa.yaml",
        "medvqa/_closed_yaml",
        "demo/vgmed_demo.yaml",
    ):
        assert f"lmms_vg_tasks/{task}" in wheel_names
    assert "lmms_vg/heads/huatuo_7b.json" in wheel_names and "lmms_vg/heads/demo.json" in wheel_names
    # every subpackage of the core (the package list is explicit): each family, method and pass module ships
    source = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lmms_vg").rglob("*.py") if "__pycache__" not in p.parts)
    assert [s for s in source if s not in wheel_names] == []
    assert "lmms_vg/demo/data/grounding.jsonl" in wheel_names and any(n.startswith("lmms_vg/demo/data/images/") for n in wheel_names)
    assert "lmms_vg/demo/model/model.safetensors" in wheel_names and "lmms_vg/demo/model/config.json" in wheel_names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in wheel_names)  # safetensors only
    entry_points = next(n for n in wheel_names if n.endswith("entry_points.txt"))
    assert entry_points


def run_python(code: str, **env) -> list[str]:
    """``code`` in a fresh interpreter of this environment (with its lmms_vg_tasks.pth); its printed words."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=full_env).stdout.split()


HEAVY = ("torch", "transformers", "datasets", "lmms_eval.tasks", "lmms_vg_models.wrapper")


def test_entry_point_registers_from_plain_data_without_heavy_imports():
    code = (
        "import sys; import lmms_eval.models as m;"
        f"print(*[name for name in {HEAVY!r} if name in sys.modules] or ['none']);"
        "print('huatuo_vgrefine' in m.MODEL_REGISTRY_V2.list_model_names(), 'huatuo_vgrefine' in m.AVAILABLE_SIMPLE_MODELS);"
        "print(m.MODEL_REGISTRY_V2.get_manifest('llava').simple_class_path.startswith('lmms_eval.'))"
    )
    heavy, registered, listed, builtin_kept = run_python(code)
    assert heavy == "none", f"loading lmms-vg's entry point imported {heavy}"
    assert (registered, listed, builtin_kept) == ("True", "True", "True")
    # the model still loads when asked for
    loaded = run_python("from lmms_eval.models import get_model; print(get_model('huatuo').__name__, get_model('vila_m3').__name__)")
    assert loaded == ["Huatuo", "VilaM3"]


def test_lmms_eval_models_lists_lmms_vg_ids():
    out = subprocess.run([sys.executable, "-m", "lmms_eval", "models"], capture_output=True, text=True, check=True).stdout
    ours = run_python("from lmms_vg.presets import model_ids; print(*model_ids())")  # as shipped
    listed = {line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith((" ", "-", "Name", "Registered"))}
    assert set(ours) <= listed
    total = int(out.split("Registered Models (")[1].split()[0])
    builtin = run_python(
        "from lmms_eval.models import AVAILABLE_SIMPLE_MODELS as s, AVAILABLE_CHAT_TEMPLATE_MODELS as c; print(len(set(s) | set(c)))"
    )
    assert total == int(builtin[0])  # every id lmms-eval knows, ours among them, none lost


def test_task_listing_shows_lmms_vg_tasks_and_built_ins_keep_priority():
    """`lmms-eval tasks list` loads no model plugin: the start-up hook puts the tasks there, once; built-in names stay lmms-eval's."""
    import yaml

    listing = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "tasks", "list"], capture_output=True, text=True, check=True
    ).stdout.split()

    class Loader(yaml.SafeLoader):  # reads lmms-eval's !function tags as plain strings
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    ours = set()
    for path in (ROOT / "tasks").rglob("*.yaml"):
        config = yaml.load(path.read_text(), Loader=Loader)
        ours.add(config.get("group") or config["task"])  # a group file lists its tasks under `task`
    assert ours <= set(listing) and all(listing.count(name) == 1 for name in ours)
    # the built-in slake group is listed, and no lmms-vg task takes a built-in name (a clash would hide ours, not theirs)
    assert "slake" in listing and "slake" not in ours and "slake_en" in listing


def test_installed_names_are_distinct_and_the_core_is_free_of_lmms_eval(tmp_path):
    """The checkout's models/ and tasks/ install as lmms_vg_models / lmms_vg_tasks: no generic top-level name is taken."""
    code = (
        "import importlib.util, sys, pathlib;"
        "print(importlib.util.find_spec('models') is None, importlib.util.find_spec('tasks') is None);"
        "import lmms_vg_models, lmms_vg_tasks;"
        "print(pathlib.Path(lmms_vg_models.__file__).parent.name, pathlib.Path(lmms_vg_tasks.__file__).parent.name);"
        "import lmms_vg.grounding, lmms_vg.methods, lmms_vg.passes, lmms_vg.report, lmms_vg.cli, lmms_vg.vqa_results;"
        "print(any(m == 'lmms_eval' or m.startswith('lmms_eval.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    no_models, no_tasks, models_dir, tasks_dir, core_imports_lmms_eval = out.stdout.split()
    assert (no_models, no_tasks) == ("True", "True")
    assert (models_dir, tasks_dir) in {("models", "tasks"), ("lmms_vg_models", "lmms_vg_tasks")}  # editable checkout or wheel
    assert core_imports_lmms_eval == "False"


class _FakeTaskManager:
    """Stands in for lmms_eval.tasks.TaskManager: records what the patched method passes on."""

    def initialize_tasks(self, include_path=None, include_defaults=True):
        return include_path


def test_task_hook_switches(monkeypatch):
    """Added once; nothing with include_defaults=False (only what the caller asked for) or with LMMS_VG_AUTO_TASKS=0."""
    from types import SimpleNamespace

    from lmms_vg_tasks import _hook

    module = SimpleNamespace(TaskManager=type("TM", (_FakeTaskManager,), {}))
    _hook.patch(module)
    _hook.patch(module)  # idempotent
    tm = module.TaskManager()
    assert tm.initialize_tasks() == [_hook.TASKS_DIR]
    assert tm.initialize_tasks(include_path="/mine") == ["/mine", _hook.TASKS_DIR]
    assert tm.initialize_tasks(include_path=["/mine", _hook.TASKS_DIR]) == ["/mine", _hook.TASKS_DIR]
    assert tm.initialize_tasks(include_path="/mine", include_defaults=False) == "/mine"
    monkeypatch.setenv("LMMS_VG_AUTO_TASKS", "0")
    assert tm.initialize_tasks(include_path="/mine") == "/mine"


def test_task_hook_declines_a_changed_task_manager_with_one_line(capsys):
    """A TaskManager whose initialize_tasks is gone or takes other arguments is left alone; one line names the fix."""
    from types import SimpleNamespace

    from lmms_vg_tasks import _hook

    _hook._warned.clear()
    renamed = SimpleNamespace(TaskManager=type("TM", (), {"index_tasks": lambda self, include_path=None: include_path}))
    assert _hook.patch(renamed) is False and not hasattr(renamed.TaskManager, "initialize_tasks")
    other_args = SimpleNamespace(TaskManager=type("TM", (), {"initialize_tasks": lambda self, paths=None: paths}))
    assert _hook.patch(other_args) is False and other_args.TaskManager().initialize_tasks("/mine") == "/mine"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--include_path" in err[0] and "lmms-vg tasks-path" in err[0]


def test_a_failing_hook_never_breaks_an_import_and_the_switch_patches_nothing(tmp_path):
    """The import hook on a module whose TaskManager changed: the import succeeds, one line; LMMS_VG_AUTO_TASKS=0: nothing patched."""
    package = tmp_path / "fake_eval"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text("class TaskManager:\n    def load(self):\n        return 'loaded'\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import lmms_vg_tasks._hook as h; h.TARGET = 'fake_eval.tasks'; h.install();"
        "import fake_eval.tasks as t; print(t.TaskManager().load())"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["loaded"]
    assert "lmms-vg: its tasks are not on lmms-eval's task path" in proc.stderr and "--include_path" in proc.stderr
    code = (
        "import sys, lmms_vg_tasks._hook as h, lmms_eval.tasks as t;"
        "print(getattr(t.TaskManager.initialize_tasks, '_lmms_vg', False), any(isinstance(f, h._Finder) for f in sys.meta_path))"
    )
    assert run_python(code, LMMS_VG_AUTO_TASKS="0") == ["False", "False"]
    assert run_python(code) == ["True", "True"]


def test_models_stay_registered_when_the_task_hook_cannot_load():
    code = (
        "import sys, lmms_vg_tasks; del lmms_vg_tasks._hook; sys.modules['lmms_vg_tasks._hook'] = None;"
        "import lmms_eval.models as m; print('huatuo_vgrefine' in m.MODEL_REGISTRY_V2.list_model_names())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.stdout.split() == ["True"]
    assert "lmms-vg: its task hook failed" in proc.stderr and "tasks-path" in proc.stderr


def test_tasks_path_command_prints_the_task_folder():
    from lmms_vg_tasks import _hook

    out = subprocess.run([sys.executable, "-m", "lmms_vg.cli", "tasks-path"], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == Path(_hook.TASKS_DIR).resolve() and (Path(out.strip()) / "vgmed" / "vgmed_loc.yaml").exists()


def test_editable_install_records_its_start_up_file_so_uninstall_removes_it(tmp_path):
    """The set-up's editable install: lmms_vg_tasks.pth in site-packages and in the RECORD; `pip uninstall` leaves nothing behind."""
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".tools", "build", "dist", "*.egg-info", "__pycache__", "lmms_vg_demo")
    )
    build = f"from setuptools import build_meta; print(build_meta.build_editable({str(wheels)!r}))"
    wheels.mkdir()
    subprocess.run([sys.executable, "-c", build], cwd=src, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert (site / "lmms_vg_tasks.pth").exists()
    assert "lmms_vg_tasks.pth," in next(site.glob("lmms_vg-*.dist-info")).joinpath("RECORD").read_text()
    subprocess.run([*pip, "uninstall", "-y", "lmms-vg"], check=True, capture_output=True)
    assert not (site / "lmms_vg_tasks.pth").exists() and not list(site.glob("lmms_vg*"))
