"""Folders a run writes into: can they be written, and making them without leaving any behind.

A refused run must leave the disk as it found it, so a folder made for a run that then stops
before writing anything is removed again (:func:`make_folder` / :func:`remove_if_empty`).
"""

from __future__ import annotations

import os
from pathlib import Path


def not_writable_reason(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be written (or made), or None when it can.

    A folder that does not exist yet counts as writable when the nearest ancestor that does
    exist is a writable folder (that is where it would be made).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    existing = folder
    while not existing.exists():  # the folder itself, or the ancestor it would be made in
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not a writable folder"
    return None


def make_folder(folder: str | Path) -> list[Path]:
    """Makes ``folder`` and its missing parents; returns the folders made, innermost first."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(exist_ok=True)  # exist_ok: another process may make it at the same time
    return missing


def remove_if_empty(made: list[Path]) -> None:
    """Removes those of the folders ``made`` (by :func:`make_folder`, or about to be made by a
    library) that are empty, the deepest first, so a folder whose only content was another of
    them goes too; a folder something was written into stays, and so do its parents."""
    for folder in sorted(made, key=lambda f: len(Path(f).parts), reverse=True):
        try:
            Path(folder).rmdir()
        except OSError:  # not empty (the run wrote something), or already gone
            pass


__all__ = ["make_folder", "not_writable_reason", "remove_if_empty"]
