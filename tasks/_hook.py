"""lmms-vg's task folder on every TaskManager's search path, added when lmms-eval's task module loads.

Nothing here imports lmms-eval: :func:`install` patches ``lmms_eval.tasks.TaskManager`` at once if
that module is loaded, else when it is (an import hook), so that listing models stays as fast
as without lmms-vg. It runs from the ``lmms_eval.models`` entry point and, at interpreter start,
from ``lmms_vg_tasks.pth``, so that listings which load no model plugin (``lmms-eval tasks list``)
show the tasks too. Built-in tasks keep priority on a name clash; ``include_defaults=False`` (only
what the caller asked for) adds nothing; ``LMMS_VG_AUTO_TASKS=0`` turns it all off before anything
is patched.

It runs in every Python process of the environment, so it imports nothing beyond what the
interpreter has loaded at start (no ``importlib.abc``: the finder and loader are plain classes,
as the import system only calls their methods). If lmms-eval's ``TaskManager`` is not as expected,
nothing is patched and one line says how to add the tasks by hand; lmms-eval itself is never broken.
"""

from __future__ import annotations

import os
import sys

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
TARGET = "lmms_eval.tasks"
SWITCH = "LMMS_VG_AUTO_TASKS"
_warned: list[str] = []


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def warn(why: str) -> None:
    """One line on stderr (once per process): the tasks are not on the path, and the fix."""
    if not _warned:
        _warned.append(why)
        sys.stderr.write(
            f"lmms-vg: its tasks are not on lmms-eval's task path ({why}); "
            f'pass --include_path "$(lmms-vg tasks-path)" to lmms-eval, or set {SWITCH}=0 to silence this\n'
        )


def patch(module) -> bool:
    """Wrap ``module.TaskManager.initialize_tasks`` so that it also indexes lmms-vg's tasks (idempotent); False where it cannot."""
    if not enabled():
        return False
    manager = getattr(module, "TaskManager", None)
    original = getattr(manager, "initialize_tasks", None)
    if original is None:
        warn(f"lmms-eval's {TARGET} has no TaskManager.initialize_tasks")
        return False
    if getattr(original, "_lmms_vg", False):
        return True
    import inspect

    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError):
        params = {}
    if not {"include_path", "include_defaults"} <= set(params):
        warn(f"TaskManager.initialize_tasks takes {list(params)}, not include_path and include_defaults")
        return False

    def initialize_tasks(self, include_path=None, include_defaults=True):
        if include_defaults and enabled():  # with include_defaults=False the caller wants its own paths only
            paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
            include_path = paths + [TASKS_DIR] if TASKS_DIR not in paths else paths
        return original(self, include_path=include_path, include_defaults=include_defaults)

    initialize_tasks._lmms_vg = True
    manager.initialize_tasks = initialize_tasks
    return True


class _PatchAfterLoad:
    """The real loader of ``lmms_eval.tasks``, then :func:`patch` (whose failure never fails the import)."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            patch(module)
        except Exception as err:  # noqa: BLE001  (lmms-eval must load whatever happens here)
            warn(f"{type(err).__name__}: {err}")

    def __getattr__(self, name):  # get_source, get_resource_reader...: the real loader's
        return getattr(self.inner, name)


class _Finder:
    """A meta-path finder for ``lmms_eval.tasks`` only: the spec the other finders give, with :class:`_PatchAfterLoad`."""

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
    """Patch now if lmms-eval's task module is loaded, else when it loads (once); nothing with the switch off."""
    if not enabled():
        return
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
