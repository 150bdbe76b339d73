"""Strict parsing of user settings (``--model_args`` values, CLI options): a wrong word is an error, never a guess.

lmms-eval turns ``true``/``false`` and numbers in ``--model_args`` into Python values and passes
every other word on as a string; ``bool("no")`` is True, so each setting is parsed here by name.
"""

from __future__ import annotations

import math

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class SettingError(ValueError):
    """A setting whose value cannot be what it names; the message says what would be accepted."""


def as_bool(name: str, value) -> bool:
    """``true/yes/on/1`` or ``false/no/off/0`` (any case), or a bool; anything else is an error."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingError(f"{name}={value!r} is not a boolean: use true or false")


def as_int(name: str, value, minimum: int | None = None) -> int:
    """A whole number (``8``, ``"8"``), at least ``minimum``."""
    if isinstance(value, float) and value.is_integer():  # lmms-eval reads some numbers in --model_args as floats
        value = int(value)
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None:
        raise SettingError(f"{name}={value!r} is not a whole number")
    if minimum is not None and number < minimum:
        raise SettingError(f"{name}={number} must be at least {minimum}")
    return number


def as_float(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """A finite number within ``[low, high]``."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError) as err:
        raise SettingError(f"{name}={value!r} is not a number") from err
    if not math.isfinite(number):
        raise SettingError(f"{name}={value!r} is not a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise SettingError(f"{name}={number:g} is outside [{low:g}, {high:g}]")
    return number


def as_layers(name: str, value) -> tuple[int, ...]:
    """``16``, ``"14;15;16"`` or ``"14 15"`` -> (14, 15, 16): layer indices, 0 or more (``;`` since lmms-eval splits on commas)."""
    if value is None or value == "":
        return ()
    if isinstance(value, (int, float)):
        return (as_int(name, value, minimum=0),)
    words = str(value).replace(";", " ").replace(",", " ").replace("/", " ").split()
    return tuple(as_int(name, word, minimum=0) for word in words)
