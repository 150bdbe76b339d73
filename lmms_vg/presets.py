"""Model families and presets: plain records, and where they come from.

A **family** (:class:`Family`) is an architecture lmms-vg can run: its adapter and the classes that
load its checkpoints. A **preset** (:class:`ModelPreset`) is a model id: a checkpoint, its chat
template and image geometry, how its original code tokenises, its VGRefine heads.

Where they come from:

- lmms-vg's own families, one module each under :mod:`lmms_vg.families`, which registers its family
  and its presets when imported (:func:`register_family`, :func:`register_preset`);
- preset files (TOML or YAML, a list of ``[[preset]]`` tables with :class:`ModelPreset`'s fields),
  named by ``LMMS_VG_PRESETS`` (paths separated by ``os.pathsep``) or by an entry point in the group
  ``lmms_vg.presets`` (an object that is, or returns, such a path): plain data, read without torch.

Listing the model ids (what ``lmms-eval models`` does) reads the family modules' text and the preset
files only: it imports neither torch nor transformers (:func:`listed_model_ids`).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

DEMO_CHECKPOINT = "lmms_vg:demo/model"  # inside the installed package
PRESETS_VAR = "LMMS_VG_PRESETS"
PRESETS_GROUP = "lmms_vg.presets"
GENERIC_MODEL_ID = "lmms_vg_llava"
METHODS = ("vgrefine", "pai", "adaptvis", "vicrop")  # lmms_vg.methods registers one class per name (tested)
METHOD_SUFFIXES = tuple(f"_{m}" for m in METHODS)
FAMILIES_DIR = Path(__file__).parent / "families"


@dataclass(frozen=True)
class Family:
    """A model family: the adapter that tells the core about it and the classes that load its checkpoints.

    ``model_types``: a checkpoint config's ``model_type`` -> the class that loads it (a transformers class
    name, or the class itself). ``options``: the ``--model_args`` its adapter takes (the adapter's
    ``take_options`` parses them). ``tiny``: ``tiny(folder) -> folder`` saves a tiny random-weight
    checkpoint of the family with its processor, on which ``lmms-vg check-family`` and the tests run
    the conformance battery (:mod:`lmms_vg.conformance`).
    """

    name: str
    adapter: type
    model_types: dict
    options: tuple[str, ...] = ()
    label: str = ""
    tiny: Callable[..., Path] | None = None


@dataclass(frozen=True)
class ModelPreset:
    """A model id: a keyword record (a family module's ``register_preset``, or a ``[[preset]]`` table of a preset file)."""

    model_id: str
    checkpoint: str = ""  # HF id or folder ("" : the user gives pretrained=, e.g. after `lmms-vg convert`)
    chat_template: str | None = None  # None: the tokenizer's own
    pad_to_square: bool = False  # the original model pads to square (LLaVA-1.5 expand2square)
    heads: str | None = None  # VGRefine's head ranking (a shipped name or a calibration JSON)
    knockout_layers: tuple[int, ...] = ()
    note: str = ""
    family: str = "llava"  # a registered family's name
    max_images: int | None = None  # images per item the original inference code keeps (first ones); None: all
    tokenisation: str = "whole"  # how its original code tokenises a prompt (adapters.TOKENISATIONS): llava, huatuo or whole


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, ModelPreset] = {}


def register_family(family: Family) -> Family:
    """Make a family known by its name (a family module does this for itself)."""
    FAMILIES[family.name] = family
    return family


def register_preset(*presets: ModelPreset) -> None:
    """Make presets known by their ids (a family module registers its own; code outside may add more)."""
    for preset in presets:
        PRESETS[preset.model_id] = preset


def load_families() -> None:
    """Import lmms-vg's family modules (each registers itself) and read the preset files (idempotent)."""
    import importlib

    for path in sorted(FAMILIES_DIR.glob("[!_]*.py")):
        importlib.import_module(f"lmms_vg.families.{path.stem}")
    register_preset(*(preset_from_record(r, where) for r, where in preset_records()))


def family_of(name: str) -> Family:
    load_families()
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def preset_files() -> list[Path]:
    """The preset files named by ``LMMS_VG_PRESETS`` and by the ``lmms_vg.presets`` entry points."""
    found = [Path(p).expanduser() for p in os.environ.get(PRESETS_VAR, "").split(os.pathsep) if p]
    from importlib.metadata import entry_points

    for ep in entry_points(group=PRESETS_GROUP):
        value = ep.load()
        value = value() if callable(value) else value
        found += [Path(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return found


def preset_records() -> list[tuple[dict, Path]]:
    """Every ``[[preset]]`` record in the preset files, with the file it came from; a file that cannot be read is named."""
    records = []
    for path in preset_files():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"preset file {path} ({PRESETS_VAR} or an {PRESETS_GROUP} entry point) cannot be read: {err}") from err
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        items = data.get("preset", []) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise TypeError(f"preset file {path}: expected a list of presets ([[preset]] tables)")
        records += [(item, path) for item in items]
    return records


def preset_from_record(record: dict, where: Path) -> ModelPreset:
    """A preset from a file's record: its fields checked by name; ``chat_template = "@file.jinja"`` read beside the file."""
    known = {f.name for f in fields(ModelPreset)}
    if not isinstance(record, dict) or "model_id" not in record:
        raise ValueError(f"preset file {where}: each preset needs a model_id (got {record!r})")
    unknown = sorted(set(record) - known)
    if unknown:
        raise ValueError(f"preset file {where}, {record['model_id']}: unknown fields {unknown}; known: {sorted(known)}")
    values = dict(record)
    values["chat_template"] = template_text(values.get("chat_template"), where.parent)
    values["knockout_layers"] = tuple(values.get("knockout_layers") or ())
    return ModelPreset(**values)


def template_text(value: str | None, folder: Path | None = None) -> str | None:
    """A chat template, or ``@path`` to a Jinja file holding one (relative to ``folder``)."""
    if not value or not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    path = path if path.is_absolute() or folder is None else folder / path
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"chat template file {path} cannot be read ({err})") from err


def listed_model_ids() -> list[str]:
    """Every model id, without importing the families: the presets the family modules declare (read from their text) and the
    preset files'. Each with its method twins."""
    base = [GENERIC_MODEL_ID]
    for path in sorted(FAMILIES_DIR.glob("[!_]*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ModelPreset":
                first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "model_id"), None)
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    base.append(first.value)
    base += [r["model_id"] for r, _ in preset_records() if isinstance(r, dict) and "model_id" in r]
    return [mid + suffix for mid in dict.fromkeys(base) for suffix in ("", *METHOD_SUFFIXES)]


def resolve_checkpoint(checkpoint: str) -> str:
    """A checkpoint id or folder; ``lmms_vg:<path>`` names a folder shipped inside the package."""
    if checkpoint.startswith("lmms_vg:"):
        from importlib import resources

        return str(resources.files("lmms_vg").joinpath(*checkpoint.removeprefix("lmms_vg:").split("/")))
    return checkpoint


def class_name(model_id: str) -> str:
    """The wrapper class lmms-eval loads for a model id (``lmms_vg_models.model_ids.<name>``): its one home."""
    return "".join(part.capitalize() for part in model_id.split("_"))


def model_ids() -> list[str]:
    """Every model id lmms-vg registers (the families loaded): each preset, and its twin per method."""
    load_families()
    return [mid + suffix for mid in (GENERIC_MODEL_ID, *PRESETS) for suffix in ("", *METHOD_SUFFIXES)]


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``huatuo_pai`` -> (``huatuo``, ``pai``); an id without a method suffix -> (id, None)."""
    for suffix in METHOD_SUFFIXES:
        if model_id.endswith(suffix):
            return model_id.removesuffix(suffix), suffix[1:]
    return model_id, None
