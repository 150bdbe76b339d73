"""Loading a transformers-native checkpoint and its processor for a wrapper, with errors that say what to do."""

from __future__ import annotations

from pathlib import Path

from loguru import logger


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says what to do."""


MAPS_MARKER = ".lmms_vg_maps"  # in a save_maps folder: lmms-vg keeps its maps here (a run again may replace them)


def maps_folder(value) -> Path | None:
    """The ``save_maps`` folder, created now: a file in its place, an unwritable path or a folder holding the user's own
    files (not a maps folder lmms-vg made) fails before any sample."""
    if not value:
        return None
    folder = Path(str(value)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_maps={value!r} is a file, not a folder: give a folder for the saved maps")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MAPS_MARKER).exists():
        raise ValueError(
            f"save_maps={value!r} holds files lmms-vg did not write; maps would be written among (and over) them: give a new or empty folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MAPS_MARKER).touch()
    except OSError as err:
        raise ValueError(f"save_maps={value!r}: cannot create the folder ({err})") from err
    return folder


def load_checkpoint(
    pretrained: str,
    model_types: dict[str, str],
    dtype,
    device_map,
    revision: str,
    trust_remote_code: bool,
    processor_kwargs: dict | None = None,
):
    """Load a transformers-native checkpoint of one of ``model_types`` (model_type -> class name) and its processor
    (``processor_kwargs``: its ``from_pretrained`` keywords, e.g. Qwen's ``max_pixels``).

    Errors say what to do: a folder without config.json, an architecture this model id does not take,
    a checkpoint that needs its own code while trust_remote_code is off.
    """
    from transformers import AutoConfig

    classes = {model_type: model_class(name) for model_type, name in model_types.items()}
    local = Path(pretrained)
    if (pretrained.startswith((".", "/", "~")) or local.exists()) and not (local.expanduser() / "config.json").exists():
        raise ModelLoadError(
            f"checkpoint path '{pretrained}' has no config.json; give a transformers-native folder or convert one (README 'Converting')"
        )
    try:
        config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{pretrained} needs its own code: pass trust_remote_code=true in --model_args if you trust it") from err
        raise ModelLoadError(f"{pretrained}: {err}") from err
    except OSError as err:
        raise ModelLoadError(
            f"cannot load '{pretrained}' ({err}); check the id or path, or download it first (offline: HF_HUB_OFFLINE=1 needs a local copy)"
        ) from err
    if config.model_type not in model_types:
        raise ModelLoadError(
            f"{pretrained} is a '{config.model_type}' checkpoint, not {' or '.join(getattr(n, '__name__', str(n)) for n in model_types.values())}. "
            "Original LLaVA-format checkpoints convert with `lmms-vg convert`; other architectures: README 'Models'."
        )
    model = (
        classes[config.model_type]
        .from_pretrained(pretrained, revision=revision, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        .eval()
    )
    return model, load_processor(pretrained, revision, trust_remote_code, **(processor_kwargs or {}))


def model_class(name) -> type:
    """The class that loads a checkpoint: a family's own (a class), or a transformers class by name."""
    if isinstance(name, type):
        return name
    import transformers

    return getattr(transformers, name)


def load_processor(pretrained: str, revision: str, trust_remote_code: bool, **image_kwargs):
    """The checkpoint's processor; where it cannot be built (Qwen2-VL's video part needs torchvision), its tokenizer and image processor.

    ``image_kwargs`` go to the image processor's ``from_pretrained`` (through the processor's, which hands them on).
    """
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code, **image_kwargs)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
        why = f"AutoProcessor gave a {type(processor).__name__}"  # a checkpoint with no processor class (e.g. VILA's)
    except (ImportError, AttributeError, ValueError, OSError) as err:
        why = str(err)
    logger.info(f"lmms-vg: {pretrained}: full processor unavailable ({why}); using its tokenizer and image processor")
    return SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code),
        image_processor=AutoImageProcessor.from_pretrained(
            pretrained, revision=revision, trust_remote_code=trust_remote_code, **image_kwargs
        ),
    )
