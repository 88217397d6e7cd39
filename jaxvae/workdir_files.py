"""Reading back the JSON files a run left in its workdir, defensively.

``config.json``, ``metrics.jsonl`` and ``eval_history.jsonl`` can be cut short (a full disk, a
killed copy) or edited by hand. Reading one that is damaged raises :class:`DamagedFileError`,
whose one-line message names the file, what is wrong and what to do; the caller then stops
before writing anything, so a damaged file is never silently replaced or appended to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL_HISTORY = "eval_history.jsonl"


class DamagedFileError(RuntimeError):
    """A workdir file cannot be read back; the message names it and says what to do."""


def _damaged(path: Path, why: str, fix: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged: {why}. Nothing was changed; {fix}")


def _text(path: Path, fix: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"it cannot be read ({type(e).__name__}: {e})", fix) from e


def read_config(workdir: str | Path) -> dict[str, Any] | None:
    """The workdir's ``config.json`` as a dict (None when there is none).

    It must be a JSON object with ``model`` and ``data`` objects (what every run writes).
    """
    path = Path(workdir) / CONFIG
    if not path.exists():
        return None
    fix = (
        "it records the config this workdir was trained with: restore it from a copy, or delete "
        f"it (rm {path}) and give that config with --config (training writes it again)."
    )
    try:
        config = json.loads(_text(path, fix))
    except json.JSONDecodeError as e:
        why = f"it is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}; cut short?)"
        raise _damaged(path, why, fix) from e
    for section in ("model", "data"):
        if not isinstance(config, dict) or not isinstance(config.get(section), dict):
            raise _damaged(path, f"it has no {section!r} section", fix)
    return config


def enclosing_workdir(folder: str | Path) -> Path | None:
    """The workdir ``folder`` lies within (its ``checkpoints/``, a step folder of it,
    ``samples/``): the nearest of its three closest parents that holds a ``config.json``."""
    for parent in list(Path(folder).absolute().parents)[:3]:
        if (parent / CONFIG).is_file():
            return parent
    return None


def enclosing_workdir_hint(folder: str | Path) -> str:
    """`` " <folder> is inside the run in W: use --workdir W."`` when ``folder`` lies within a
    workdir (:func:`enclosing_workdir`), else ``""``: for the messages about a workdir that
    holds no run."""
    run = enclosing_workdir(folder)
    if run is None:
        return ""
    return f" {Path(folder).absolute()} is inside the run in {run}: use --workdir {run}."


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, one per non-blank line ([] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(_text(path, "move it away and run again.").splitlines(), 1):
        if not line.strip():
            continue
        fix = (
            f"remove that line (sed -i '{number}d' {path}) or move the file away, then run the "
            "same command again."
        )
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            why = f"line {number} is not valid JSON (column {e.colno}: {e.msg}; cut short?)"
            raise _damaged(path, why, fix) from e
        if not isinstance(record, dict):
            raise _damaged(path, f"line {number} is not a JSON object", fix)
        records.append(record)
    return records


__all__ = [
    "CONFIG",
    "EVAL_HISTORY",
    "METRICS",
    "DamagedFileError",
    "enclosing_workdir",
    "enclosing_workdir_hint",
    "read_config",
    "read_jsonl",
]
