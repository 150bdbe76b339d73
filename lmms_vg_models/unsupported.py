"""Model ids for the paper's models that transformers cannot load natively: they fail at once, saying why."""

from lmms_eval.api.model import lmms

REASONS = {
    "vila_m3": "VILA-M3 (8B/13B) runs on the VILA codebase (SigLIP + its own LLaVA fork), which has no transformers-native class.",
    "medrega": "MedRegA is an InternVL-based model loaded only with trust_remote_code and its own chat() API; its attention does not go through transformers' AttentionInterface.",
    "llava_tri": "LLaVA-Tri uses an S2 multi-scale CLIP encoder, which LlavaForConditionalGeneration does not implement.",
    "huatuo_bio": "HuatuoGPT-V-Bio uses a BiomedCLIP (open_clip) encoder, which LlavaForConditionalGeneration does not implement.",
}
UNSUPPORTED = {model_id: "".join(p.capitalize() for p in model_id.split("_")) for model_id in REASONS}


class _Unsupported(lmms):
    model_id = ""

    def __init__(self, **kwargs):
        raise NotImplementedError(
            f"{self.model_id}: {REASONS[self.model_id]} lmms-vg cannot load it. To proceed: run it in its own codebase, "
            "or port it to a transformers-native class and add a wrapper (README 'Adding a model')."
        )

    def loglikelihood(self, requests):  # pragma: no cover - never constructed
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


globals().update({cls: type(cls, (_Unsupported,), {"model_id": mid}) for mid, cls in UNSUPPORTED.items()})
