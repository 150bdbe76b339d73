"""VGRefine (SPEC section 3): attention triage with calibrated heads, then knockout at chosen layers.

Per sample, on the model's passes (:mod:`lmms_vg.passes`: the image prefix run once where the model allows):

1. question maps of the selected heads, and the generic prompt's head-averaged maps of their
   layers (cached per image);
2. triage: the selected heads' normalised maps averaged; patches below the p-th percentile are
   irrelevant;
3. generation with those patches blocked, at the knockout layers, for every prompt token after
   the image (the question, the instruction and the chat-template tokens); decode steps untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import engine, metrics, settings
from ..passes import Passes, same_grid
from ..prompts import GENERIC_PROMPT, SHORT_ANSWER
from .base import Asked, GroundingPlan, Method, MethodOutcome, register

HEADS_DIR = "heads"


class VGRefineConfigError(ValueError):
    """A VGRefine setting that cannot work with this model; raised before any sample runs."""


@dataclass(frozen=True)
class HeadRanking:
    """Ranked (layer, head) pairs, best first, with where they came from."""

    heads: tuple[tuple[int, int], ...]
    knockout_layers: tuple[int, ...]
    model: str = ""
    source: str = ""
    samples: int | None = None
    scores: tuple[float, ...] = ()
    percentile: float | None = None  # the triage percentile chosen with the ranking (None: the paper's 50)

    def to_json(self) -> str:
        record = {
            "model": self.model,
            "source": self.source,
            "samples": self.samples,
            "knockout_layers": list(self.knockout_layers),
            "heads": [list(h) for h in self.heads],
            "mean_kl": list(self.scores),
        }
        if self.percentile is not None:
            record["percentile"] = self.percentile
        return json.dumps(record, indent=1)


def load_heads(name_or_path: str) -> HeadRanking:
    """A shipped ranking by name (e.g. ``huatuo_7b``) or a JSON file written by calibration."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise VGRefineConfigError(
                f"heads file '{path}' not found; give a shipped ranking name ({', '.join(shipped_heads())}) or a calibration JSON"
            )
        text = path.read_text()
    else:
        shipped = resources.files("lmms_vg").joinpath(HEADS_DIR, f"{name_or_path}.json")
        if not shipped.is_file():
            raise VGRefineConfigError(
                f"no head ranking named '{name_or_path}'; shipped: {', '.join(shipped_heads())}; or give a calibration JSON path"
            )
        text = shipped.read_text()
        path = Path(str(shipped))
    try:
        data = json.loads(text)
        heads = tuple((whole(layer, path), whole(head, path)) for layer, head in data["heads"])
        knockout_layers = tuple(whole(x, path) for x in data.get("knockout_layers", ()))
        percentile = None if data.get("percentile") is None else float(data["percentile"])
    except json.JSONDecodeError as err:
        raise VGRefineConfigError(f"heads file '{path}' is not valid JSON ({err}); rewrite it with `lmms-vg calibrate`") from err
    except KeyError as err:
        raise VGRefineConfigError(f"heads file '{path}' has no {err} list; rewrite it with `lmms-vg calibrate`") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise VGRefineConfigError(f"heads file '{path}': 'heads' must be a list of [layer, head] pairs ({err})") from err
    if not heads:
        raise VGRefineConfigError(f"heads file '{path}' lists no heads; calibrate with --top-k of 1 or more")
    repeated = sorted({h for i, h in enumerate(heads) if h in heads[:i]})
    if repeated:  # a head listed twice would be averaged twice and count twice towards K
        raise VGRefineConfigError(f"heads file '{path}' lists {[list(h) for h in repeated]} more than once; each head once")
    if any(layer < 0 or head < 0 for layer, head in heads) or any(x < 0 for x in knockout_layers):
        raise VGRefineConfigError(f"heads file '{path}' has a negative layer or head index")
    return HeadRanking(
        heads=heads,
        knockout_layers=knockout_layers,
        model=data.get("model", ""),
        source=data.get("source", ""),
        samples=data.get("samples"),
        scores=tuple(data.get("mean_kl", ())),
        percentile=percentile,
    )


def whole(value, path: Path) -> int:
    """An index from a heads file: a whole number (``2.5`` or ``"2"`` is an error, not a head), named with the file."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise VGRefineConfigError(f"heads file '{path}': {value!r} is not a layer or head index (whole numbers only)")
    return int(value)


def config_from_args(
    model: str,
    heads: str | None,
    top_k,
    percentile,
    knockout_layers,
    mode,
    default_layers: tuple[int, ...] = (),
    normalise: bool = True,
) -> VGRefineConfig:
    """The method's settings from user arguments (strings or numbers, as ``--model_args`` gives them), checked.

    ``heads``: a shipped ranking name or a calibration JSON; knockout layers from the arguments, else
    the head ranking's, else ``default_layers`` (the model preset's); K defaults to 20 (the paper's) or
    to every head the ranking lists, if fewer; the percentile to the ranking's, else the paper's 50.
    """
    if not heads:
        raise ValueError(
            f"{model}: VGRefine needs heads=<ranking name or calibration JSON>; none is published for this model (README 'VGRefine')"
        )
    ranking = load_heads(str(heads))
    layers = settings.as_layers("knockout_layers", knockout_layers) or ranking.knockout_layers or tuple(default_layers)
    return VGRefineConfig(
        heads=ranking.heads,
        knockout_layers=layers,
        top_k=settings.as_int("top_k", top_k, minimum=1) if top_k is not None else min(20, len(ranking.heads)),
        # its range is checked by VGRefineConfig
        percentile=settings.as_float("percentile", percentile)
        if percentile is not None
        else (ranking.percentile if ranking.percentile is not None else 50.0),
        mode=str(mode),
        reference_prompt=(GENERIC_PROMPT + SHORT_ANSWER) if normalise else None,
    )


def shipped_heads() -> list[str]:
    folder = resources.files("lmms_vg").joinpath(HEADS_DIR)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


@dataclass(frozen=True)
class VGRefineConfig:
    """The method's settings; paper defaults K=20, p=50, mode 'mask' (the authors' code)."""

    heads: tuple[tuple[int, int], ...]
    knockout_layers: tuple[int, ...]
    top_k: int = 20
    percentile: float = 50.0
    mode: str = "mask"
    reference_prompt: str | None = GENERIC_PROMPT + SHORT_ANSWER
    selected: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self):
        if not 0 <= self.percentile <= 100:
            raise VGRefineConfigError(f"percentile={self.percentile} is outside [0, 100]")
        if self.mode not in engine.KNOCKOUT_MODES:
            raise VGRefineConfigError(f"knockout_mode={self.mode!r} is not one of {engine.KNOCKOUT_MODES}")
        if self.top_k < 1 or self.top_k > len(self.heads):
            raise VGRefineConfigError(f"top_k={self.top_k} but the head ranking lists {len(self.heads)} heads; use 1..{len(self.heads)}")
        if not self.knockout_layers:
            raise VGRefineConfigError("no knockout layer: give knockout_layers= or a head ranking that names them")
        object.__setattr__(self, "selected", tuple(self.heads[: self.top_k]))

    def check(self, adapter) -> None:
        """Against the loaded model, before any sample."""
        text = adapter.model.config.text_config
        self.validate_for(text.num_hidden_layers, text.num_attention_heads, adapter.name)

    def validate_for(self, n_layers: int, n_heads: int, model_name: str) -> None:
        """Heads and layers must exist in the model (checked before any sample runs)."""
        bad = [list(h) for h in self.selected if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
        if bad:
            raise VGRefineConfigError(f"{model_name} has {n_layers} layers x {n_heads} heads; the ranking's heads {bad} do not exist in it")
        bad_layers = [layer for layer in self.knockout_layers if not 0 <= layer < n_layers]
        if bad_layers:
            raise VGRefineConfigError(f"knockout_layers {bad_layers} out of range for {model_name} (0..{n_layers - 1})")

    @property
    def map_layers(self) -> frozenset[int]:
        return frozenset(layer for layer, _ in self.selected)

    def settings(self) -> dict:
        """What a results file records of this configuration (the heads as used: the top K)."""
        return {
            "heads": [list(h) for h in self.selected],
            "top_k": self.top_k,
            "percentile": self.percentile,
            "knockout_layers": list(self.knockout_layers),
            "mode": self.mode,
            "reference_prompt": self.reference_prompt,
        }

    def keep(self, question: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """The triage: bool ``[B, N]``, the patches kept (maps ``[B, L, H, N]``; reference None when normalisation is off)."""
        return triage_keep(triage_map(question, reference, self.selected), self.percentile)


def triage_map(question: torch.Tensor, reference: torch.Tensor | None, heads: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Mean of the selected heads' maps, each divided by its layer's head-averaged reference map.

    question, reference: ``[B, L, H, N]`` -> ``[B, N]``.
    """
    layers = torch.tensor([l for l, _ in heads])
    idx = torch.tensor([h for _, h in heads])
    picked = question[:, layers, idx]  # [B, K, N]
    if reference is not None:
        picked = metrics.normalise_by_reference(picked, reference.mean(2)[:, layers])
    return picked.mean(1)


def triage_keep(triage: torch.Tensor, percentile: float) -> torch.Tensor:
    """Bool ``[B, N]``: patches at or above the p-th percentile (linear interpolation, as numpy) are kept."""
    threshold = torch.quantile(triage.double(), percentile / 100.0, dim=-1, keepdim=True)
    return triage.double() >= threshold


@dataclass
class RefineOutcome:
    tokens: torch.Tensor  # [B, new]
    knocked_fraction: list[float]
    layers: tuple[int, ...]
    keep: torch.Tensor  # [B, N] bool, patches kept by triage
    first_logits: torch.Tensor | None = None  # [B, vocab], with output_logits=True


class VGRefiner:
    """Runs VGRefine generation for an adapter's model."""

    def __init__(self, adapter, config: VGRefineConfig, reference_cache_size: int = 64, share_layers: bool = True):
        """``share_layers``: resume the knocked-out pass from the maps pass below the first knockout layer (greedy answers)."""
        self.share_layers = share_layers
        self.config = config
        text = adapter.model.config.text_config
        config.validate_for(text.num_hidden_layers, text.num_attention_heads, adapter.name)
        self.passes = Passes(adapter, reference_cache_size)

    def generate(self, images, texts, image_keys=None, reference_prompt: str | None = None, **generate_kwargs) -> RefineOutcome:
        """VGRefine answers; ``reference_prompt`` overrides the configured generic prompt (when normalisation is on)."""
        cfg = self.config
        prompt = (reference_prompt or cfg.reference_prompt) if cfg.reference_prompt else None
        batch = self.passes.batch(images, texts, image_keys)
        # below the first knockout layer the knocked-out pass computes what the maps pass computed: it resumes there
        resume = batch.resume_point(min(min(cfg.knockout_layers), max(cfg.map_layers) + 1)) if self.share_layers else None
        keep = cfg.keep(*batch.question_and_reference(prompt, cfg.map_layers, keep=resume))  # [B, N]
        knockout = batch.knockout(keep, cfg.knockout_layers, cfg.mode)
        tokens, first_logits = batch.generate(knockout, resume=resume, **generate_kwargs)
        return RefineOutcome(tokens, (~keep).float().mean(1).tolist(), cfg.knockout_layers, keep, first_logits)


def calibrate(head_kl: np.ndarray, top_k: int, knockout_layers: tuple[int, ...], model: str, source: str, samples: int) -> HeadRanking:
    """Rank heads by mean KL (``[layers, heads]``, lower is better) into a ranking."""
    head_kl = np.asarray(head_kl, dtype=float)
    order = np.argsort(head_kl, axis=None, kind="stable")[:top_k]
    heads = tuple((int(i // head_kl.shape[1]), int(i % head_kl.shape[1])) for i in order)
    return HeadRanking(heads, tuple(knockout_layers), model, source, samples, tuple(float(head_kl.flat[i]) for i in order))


VGREFINE_ARGS = ("heads", "top_k", "percentile", "knockout_layers", "knockout_mode")


@register
class VGRefine(Method):
    """VGRefine as a method: the triage and knockout per answer; grounding measured with its knockout in place."""

    name, label, Settings = "vgrefine", "VGRefine", VGRefineConfig
    one_image = True

    def __init__(self, adapter, settings_: VGRefineConfig, reference_cache_size: int = 64) -> None:
        super().__init__(adapter, settings_, reference_cache_size)
        self.refiner = VGRefiner(adapter, settings_, reference_cache_size)

    @classmethod
    def argument_names(cls) -> frozenset[str]:
        return frozenset(VGREFINE_ARGS)

    @classmethod
    def settings_from_args(cls, args: dict, defaults: dict) -> VGRefineConfig:
        """``heads``, ``top_k``, ``percentile``, ``knockout_layers``, ``knockout_mode``; the preset's heads and layers by default."""
        unknown = sorted(set(args) - set(VGREFINE_ARGS))
        if unknown:
            raise VGRefineConfigError(f"vgrefine: unknown settings {unknown}; it takes {sorted(VGREFINE_ARGS)}")
        return config_from_args(
            defaults.get("model", "model"),
            args.get("heads") or defaults.get("heads"),
            args.get("top_k"),
            args.get("percentile"),
            args.get("knockout_layers"),
            args.get("knockout_mode", "mask"),
            default_layers=tuple(defaults.get("knockout_layers", ())),
            normalise=defaults.get("normalise", True),
        )

    def answer(self, asked: Asked, **generate_kwargs) -> MethodOutcome:
        """Each group of one token grid in one batch (their prefixes must share a length); the samples in their order."""
        images = [imgs[0] for imgs in asked.images]
        rows, details, fields = [None] * len(images), [{}] * len(images), [{}] * len(images)
        config = self.settings
        used = (asked.reference_prompt or config.reference_prompt) if config.reference_prompt else None
        for group in same_grid(self.adapter, images):
            outcome = self.refiner.generate(
                [images[n] for n in group],
                [asked.texts[n] for n in group],
                image_keys=[asked.image_keys[n] for n in group],
                reference_prompt=asked.reference_prompt,
                **generate_kwargs,
            )
            for n, row, fraction in zip(group, outcome.tokens, outcome.knocked_fraction):
                rows[n] = row
                fields[n] = {"knocked_fraction": round(fraction, 6), "knockout_layers": tuple(config.knockout_layers)}
                details[n] = {"reference_prompt": used}
        return MethodOutcome(rows, None, details, fields)

    def grounding(self) -> GroundingPlan:
        return GroundingPlan(knockout=self.settings)

    def record(self) -> dict:
        return self.settings.settings()

    def not_applied(self, n_images: int) -> dict:
        return {"vgrefine": f"not applied: {n_images} images (the knockout is defined for one)"}
