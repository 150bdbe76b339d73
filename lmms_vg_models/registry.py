"""The ``lmms_eval.models`` entry point: lmms-vg's model ids, and its task folder on lmms-eval's search path.

lmms-eval 0.7.3 indexes tasks only from its own folder and ``--include_path``. Loading this entry
point (which lmms-eval does when it imports its model registry, before building a TaskManager)
adds lmms-vg's task folder to every TaskManager's search path. Built-in tasks keep priority on a
name clash. Set ``LMMS_VG_AUTO_TASKS=0`` to turn this off and pass ``--include_path`` yourself.
"""

from __future__ import annotations

import os
from importlib import resources

from lmms_eval.models.registry_v2 import ModelManifest

TASKS_DIR = str(resources.files("lmms_vg_tasks"))


def manifests() -> list[ModelManifest]:
    """lmms-vg's models, and (unless LMMS_VG_AUTO_TASKS=0) its tasks on the search path."""
    if os.environ.get("LMMS_VG_AUTO_TASKS", "1") != "0":
        add_task_path()
    from lmms_vg.presets import class_name, model_ids
    from lmms_vg_models.unsupported import UNSUPPORTED

    found = [ModelManifest(model_id=mid, simple_class_path=f"lmms_vg_models.llava.{class_name(mid)}") for mid in model_ids()]
    found += [ModelManifest(model_id=mid, simple_class_path=f"lmms_vg_models.unsupported.{cls}") for mid, cls in UNSUPPORTED.items()]
    return found


def add_task_path() -> None:
    """Make every TaskManager also index lmms-vg's tasks (idempotent)."""
    from lmms_eval.tasks import TaskManager

    original = TaskManager.initialize_tasks
    if getattr(original, "_lmms_vg", False):
        return

    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
        if TASKS_DIR not in paths:
            paths.append(TASKS_DIR)
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks._lmms_vg = True
    TaskManager.initialize_tasks = initialize_tasks
