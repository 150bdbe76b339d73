"""One class per model id (the wrapper with its preset and family set), and presets added at run time.

lmms-eval imports a model's class from here (``lmms_vg_models.model_ids.<ClassName>``, the name from
:func:`lmms_vg.presets.class_name`) when a run asks for that model id.
"""

from __future__ import annotations

from lmms_vg import presets
from lmms_vg.presets import METHOD_SUFFIXES, PRESETS, ModelPreset, class_name, model_ids, split_model_id
from lmms_vg_models.wrapper import VGModel


def _make(model_id: str) -> type[VGModel]:
    """The class for a model id: its preset (None for the generic id) and its method (``*_vgrefine``, ``*_pai``, ``*_adaptvis``)."""
    base, method = split_model_id(model_id)
    attrs = {"preset": PRESETS.get(base), "method_default": method, "__module__": __name__}
    return type(class_name(model_id), (VGModel,), attrs)


MODEL_CLASSES: dict[str, type[VGModel]] = {mid: _make(mid) for mid in model_ids()}


def __getattr__(name: str) -> type[VGModel]:
    """``lmms_vg_models.model_ids.<ClassName>``: the class lmms-eval's manifest names (PEP 562 module attribute)."""
    for cls in MODEL_CLASSES.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_preset(preset: ModelPreset) -> list:
    """Add a preset at run time (e.g. from code that has already loaded torch): its classes, and manifests for lmms-eval.

    A preset file (``LMMS_VG_PRESETS`` or an ``lmms_vg.presets`` entry point: README "Adding a model") does the
    same for every run, listed by ``lmms-eval models`` without importing torch; this is for code that cannot use one.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    presets.register_preset(preset)
    manifests = []
    for mid in (preset.model_id, *(preset.model_id + suffix for suffix in METHOD_SUFFIXES)):
        cls = MODEL_CLASSES[mid] = _make(mid)
        manifests.append(ModelManifest(model_id=mid, simple_class_path=f"{__name__}.{cls.__name__}"))
    return manifests
