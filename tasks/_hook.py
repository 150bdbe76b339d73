"""lmms-vg's task folder on every TaskManager's search path, added when lmms-eval's task module loads.

Nothing here imports lmms-eval: :func:`install` patches ``lmms_eval.tasks.TaskManager`` at once if
that module is loaded, else when it is (an import hook), so that listing models stays as fast
as without lmms-vg. It runs from the ``lmms_eval.models`` entry point and, at interpreter start,
from ``lmms_vg_tasks.pth``, so that listings which load no model plugin (``lmms-eval tasks list``)
show the tasks too. Built-in tasks keep priority on a name clash; ``include_defaults=False`` (only
what the caller asked for) adds nothing; ``LMMS_VG_AUTO_TASKS=0`` turns it all off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
TARGET = "lmms_eval.tasks"


def enabled() -> bool:
    return os.environ.get("LMMS_VG_AUTO_TASKS", "1") != "0"


def patch(module) -> None:
    """Wrap ``module.TaskManager.initialize_tasks`` so that it also indexes lmms-vg's tasks (idempotent)."""
    manager = module.TaskManager
    original = manager.initialize_tasks
    if getattr(original, "_lmms_vg", False):
        return

    def initialize_tasks(self, include_path=None, include_defaults=True):
        if include_defaults and enabled():  # with include_defaults=False the caller wants its own paths only
            paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
            include_path = paths + [TASKS_DIR] if TASKS_DIR not in paths else paths
        return original(self, include_path=include_path, include_defaults=include_defaults)

    initialize_tasks._lmms_vg = True
    manager.initialize_tasks = initialize_tasks


class _PatchAfterLoad(importlib.abc.Loader):
    """The real loader of ``lmms_eval.tasks``, then :func:`patch`."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name):  # get_source, get_resource_reader...: the real loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Patch now if lmms-eval's task module is loaded, else when it loads (once)."""
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
