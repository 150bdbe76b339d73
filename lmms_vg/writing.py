"""How lmms-vg writes what a user asks for: staged, then moved into place, never over a file the user owns.

Every command that writes a folder (reports, heatmaps, the demo, ``convert``) writes into a staging
folder beside its target first; only when everything is written are the files moved into the target.
An interrupted command leaves nothing half-written there. A file already at a target path is replaced
only if lmms-vg wrote it and it has not changed since (the target's ``.lmms_vg_written.json`` lists
each file lmms-vg wrote, with its hash and the command that wrote it); any other is the user's, and the
command stops before moving anything unless ``--force``. A file the same command wrote before,
unchanged, in a folder the new output writes to and no longer part of it, is removed (it is
superseded); other commands' files and the user's are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = ".lmms_vg_written.json"


class OwnedFileError(FileExistsError):
    """A write would replace files lmms-vg did not write (or that changed since); the message names them and what to do."""


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def written_before(folder: Path) -> dict[str, dict]:
    """The files lmms-vg wrote into ``folder`` before: relative path -> ``{"sha256", "by"}`` (the command)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and "sha256" in v} if isinstance(data, dict) else {}


def written_within(folder: Path) -> dict[str, dict]:
    """The files lmms-vg wrote anywhere under ``folder``: its own list and those of the folders inside it that a command
    wrote into (``report/browser`` has its own), as paths relative to ``folder``; the deeper list is the newer word."""
    folder = Path(folder)
    lists = sorted(folder.rglob(MANIFEST), key=lambda p: len(p.parts)) if folder.is_dir() else []
    merged: dict[str, dict] = {}
    for listing in lists:
        prefix = listing.parent.relative_to(folder)
        merged.update({str(prefix / k): v for k, v in written_before(listing.parent).items()})
    return merged


def ours(folder: Path, relative: str, manifest: dict[str, dict], by: str | None = None) -> bool:
    """Whether the file at ``folder/relative`` is one lmms-vg (``by`` that command) wrote and nobody changed since."""
    path, entry = folder / relative, manifest.get(relative)
    return entry is not None and (by is None or entry.get("by") == by) and path.is_file() and digest(path) == entry["sha256"]


def _save(folder: Path, manifest: dict[str, dict]) -> None:
    (folder / MANIFEST).write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")


def users_files(folder: Path, names: list[str] | None = None) -> list[str]:
    """Of ``names`` (relative paths; None: every file in ``folder``), those that exist and are not lmms-vg's own, unchanged."""
    if not folder.exists():
        return []
    manifest = written_within(folder)
    if names is None:
        names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    return sorted(n for n in names if (folder / n).exists() and not ours(folder, n, manifest))


@contextlib.contextmanager
def staged(target: Path, force: bool = False, exclusive: bool = False, what: str = "lmms-vg") -> Iterator[Path]:
    """A fresh folder to write ``target``'s new files into; when the block ends without error they move into ``target``.

    Refused (``OwnedFileError``, nothing moved) where a new file would replace one of the user's, or with
    ``exclusive`` (a model folder: ``convert``) where ``target`` holds any file of the user's at all,
    unless ``force``. ``what`` names the command in the message.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield stage
        new = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        clash = users_files(target, None if exclusive else new)
        if clash and not force:
            listed = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
            kind = "holds files lmms-vg did not write" if exclusive else "would replace files lmms-vg did not write (or that changed since)"
            raise OwnedFileError(f"{what}: {target} {kind}: {listed}. Choose another folder, or pass --force to replace them")
        _move_into_place(stage, target, new, what)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_into_place(stage: Path, target: Path, new: list[str], by: str) -> None:
    manifest = written_before(target)
    folders = {str(Path(n).parent) for n in new}
    for old in list(manifest):  # the same command's earlier files in the folders written now, unchanged and superseded
        if old not in new and str(Path(old).parent) in folders and ours(target, old, manifest, by):
            (target / old).unlink()
            del manifest[old]
    for name in new:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, destination)
        manifest[name] = {"sha256": digest(destination), "by": by}
    _save(target, manifest)


def in_place(paths: list[Path], stage: Path, target: Path) -> list[Path]:
    """Where files written under ``stage`` are once moved into ``target``."""
    target = Path(target).expanduser().resolve()
    return [target / Path(p).relative_to(stage) if Path(p).is_relative_to(stage) else Path(p) for p in paths]


def refuse_existing_file(path: Path, force: bool, what: str) -> None:
    """A single output file: refused where it exists, unless ``force``."""
    if Path(path).exists() and not force:
        raise OwnedFileError(f"{what}: {path} exists; choose another name, or pass --force to replace it")


def clear_own(target: Path, under: list[str], force: bool = False, what: str = "lmms-vg") -> None:
    """Before a command writes under ``target/<under...>`` itself (the demo's lmms-eval runs): refused where the user has
    files there (unless ``force``); lmms-vg's own earlier files there, unchanged, are removed (they are superseded)."""
    target = Path(target).expanduser().resolve()
    manifest = written_within(target)
    inside = [str(p.relative_to(target)) for p in files_under(target, under)]
    clash = sorted(n for n in inside if not ours(target, n, manifest))
    if clash and not force:
        listed = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
        raise OwnedFileError(
            f"{what}: {target} holds files lmms-vg did not write where it writes: {listed}. Choose another folder, or pass --force"
        )
    for name in inside:
        if name not in clash:
            (target / name).unlink()
    for listing in [target / MANIFEST, *(p for u in under if (target / u).is_dir() for p in (target / u).rglob(MANIFEST))]:
        if listing.exists():  # each list keeps only the files still there
            _save(listing.parent, {k: v for k, v in written_before(listing.parent).items() if (listing.parent / k).is_file()})


def record(target: Path, paths: list[Path], by: str) -> None:
    """Add files a command (``by``) wrote under ``target`` itself to its list of lmms-vg's files."""
    target = Path(target).expanduser().resolve()
    manifest = written_before(target)
    for path in paths:
        path = Path(path).resolve()
        if path.is_file():
            manifest[str(path.relative_to(target))] = {"sha256": digest(path), "by": by}
    _save(target, manifest)


def files_under(target: Path, under: list[str]) -> list[Path]:
    """The files at or below ``target/<under...>`` (lmms-vg's lists left out)."""
    found = []
    for u in under:
        path = Path(target) / u
        found += [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file() and p.name != MANIFEST]
    return found
