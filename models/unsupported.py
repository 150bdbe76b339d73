"""Model ids for the paper's models that transformers cannot load natively: they fail at once, saying why."""

from lmms_eval.api.model import lmms

from lmms_vg.presets import UNSUPPORTED, class_name


class _Unsupported(lmms):
    model_id = ""

    def __init__(self, **kwargs):
        raise NotImplementedError(
            f"{self.model_id}: {UNSUPPORTED[self.model_id]} lmms-vg cannot load it. To proceed: run it in its own codebase, "
            "or port it to a transformers-native class and add a wrapper (README 'Adding a model')."
        )

    def loglikelihood(self, requests):  # pragma: no cover - never constructed
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


def __getattr__(name: str) -> type[_Unsupported]:
    """``lmms_vg_models.unsupported.<ClassName>``: the class lmms-eval's manifest names for an unsupported id."""
    for mid in UNSUPPORTED:
        if class_name(mid) == name:
            return type(name, (_Unsupported,), {"model_id": mid, "__module__": __name__})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
