"""The ``lmms_eval.models`` entry point: lmms-vg's model ids, from plain data.

lmms-eval loads this whenever it builds its model registry (``lmms-eval models`` included), so it
imports neither torch, transformers nor lmms-eval's task machinery: the ids come from the family
modules' text and the preset files (:func:`lmms_vg.presets.listed_model_ids`), the manifests name
each model's class by path, and the class loads only when a run asks for that model. It also installs
the hook that puts lmms-vg's task folder on every TaskManager's search path (:mod:`lmms_vg_tasks._hook`);
a hook that fails costs the tasks' automatic path only (one line says how to add it by hand), never the models.
"""

from __future__ import annotations

import sys

from lmms_eval.models.registry_v2 import ModelManifest

from lmms_vg.presets import class_name, listed_model_ids


def install_task_hook() -> None:
    """The task hook, if it can be had; a failure is one line on stderr and the models are registered regardless."""
    try:
        from lmms_vg_tasks import _hook

        _hook.install()
    except Exception as err:  # noqa: BLE001  (any failure here costs the tasks' path only, never the models)
        sys.stderr.write(
            f"lmms-vg: its task hook failed ({type(err).__name__}: {err}); "
            'pass --include_path "$(lmms-vg tasks-path)" to lmms-eval to find its tasks\n'
        )


def manifests() -> list[ModelManifest]:
    """lmms-vg's models (each with the class path lmms-eval imports when it is asked for), and its tasks on the search path.

    An id that lmms-eval already has is left to lmms-eval. Each id is also entered in the table
    ``lmms-eval models`` prints (as lmms-eval's own plugin mechanism does), which reads only that table.
    """
    install_task_hook()
    paths = {mid: f"lmms_vg_models.model_ids.{class_name(mid)}" for mid in listed_model_ids()}
    listed = sys.modules.get("lmms_eval.models")  # being initialised: it is loading this entry point
    simple = getattr(listed, "AVAILABLE_SIMPLE_MODELS", {})
    builtin = set(simple) | set(getattr(listed, "AVAILABLE_CHAT_TEMPLATE_MODELS", {}))
    found = []
    for mid, path in paths.items():
        if mid in builtin:
            continue
        found.append(ModelManifest(model_id=mid, simple_class_path=path))
        simple[mid] = path
    return found
