"""Reading source files: paths from environment variables, JSON lines, images, each failure named with what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path


class DataError(FileNotFoundError):
    """Data that is not where the settings say; the message names the setting."""


class ImageError(OSError):
    """An image that cannot be used (corrupt, truncated, too large); the message names the file."""


def env_path(var: str, what: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise DataError(f"{what}: set {var} to the folder that holds it (see README 'Data')")
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"{what}: {var}={value} does not exist")
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n} is not valid JSON ({err})") from err
    return rows


def open_image(path, name: str | None = None):
    """Open an image (a file path, or a file object named by ``name``), fully decoded; errors name it and say what is wrong."""
    from PIL import Image

    path_name = name or str(path)
    try:
        with Image.open(path) as img:
            return decode_image(img, path_name)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image not found: '{path_name}'") from err
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"image too large: '{path_name}' is over PIL's decompression-bomb limit ({err}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from err
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(f"image unreadable: '{path_name}' ({err})") from err


def decode_image(img, name: str):
    """Decode every pixel of an opened image (a copy), failing on a truncated file.

    lmms-eval turns PIL's ``LOAD_TRUNCATED_IMAGES`` on for the whole process, which would let a
    half-written file decode as a partly grey image; it is turned off for this decode.
    """
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
        return img.copy()
    except OSError as err:
        raise ImageError(f"image truncated or corrupt: '{name}' ({err}); re-download or re-extract it") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def demo_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("lmms_vg").joinpath("demo", "data")))
