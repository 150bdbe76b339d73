"""Why a sample was skipped or excluded: one convention, so that reasons can be counted by kind.

A reason reads ``"<kind>: <details> (<where>)"``: the kind first (``image truncated or corrupt``),
then what was found and what to do, then the file and line or the task and doc it concerns. The
per-sample logs keep the whole reason; the task's counts group by :func:`reason_key`.
"""

from __future__ import annotations


def located(reason: str, where: str) -> str:
    """The reason with where it happened appended (a file and line, a task and doc)."""
    return f"{reason} ({where})" if where else reason


def reason_key(reason: str) -> str:
    """The reason's kind: the words before the first ``": "`` (or before its ``(where)``)."""
    return reason.split(": ")[0].split(" (")[0].strip()[:80]
