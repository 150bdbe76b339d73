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


def read_text(path: Path) -> str:
    """A UTF-8 text file; a byte that is not UTF-8 is named with the file, its offset and line, not a bare UnicodeDecodeError."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}); "
            "re-save the file as UTF-8 or download it again"
        ) from err


def read_json(path: Path):
    """A JSON file, its errors named with the file (and line)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); download it again") from err


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
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
        return upright(img.copy())
    except OSError as err:
        raise ImageError(f"image truncated or corrupt: '{name}' ({err}); re-download or re-extract it") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


ORIENTATION = 0x0112  # the EXIF tag
ROTATED = "lmms_vg_exif_orientation"  # image.info key: the EXIF orientation an image was turned upright from


def upright(image):
    """The image as a viewer displays it: turned by its EXIF orientation (a phone's or scanner's JPEG), as transformers'
    ``load_image`` and datasets' Image feature turn it, so that boxes drawn on the displayed image land where drawn.
    The orientation it had is kept in ``image.info[ROTATED]`` for the sample's record."""
    from PIL import ImageOps

    orientation = image.getexif().get(ORIENTATION)
    if not orientation or orientation == 1:
        return image
    turned = ImageOps.exif_transpose(image)
    turned.info[ROTATED] = int(orientation)
    return turned


def orientations(images) -> list[int] | None:
    """The EXIF orientations the images were turned upright from (0: none), or None where none was turned."""
    found = [int(getattr(image, "info", {}).get(ROTATED, 0)) for image in images]
    return found if any(found) else None


def demo_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("lmms_vg").joinpath("demo", "data")))
