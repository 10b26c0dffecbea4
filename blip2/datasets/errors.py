"""The one error the dataset loaders raise, and the checks that raise it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset file is missing or not in the format its loader reads; the message says what to fix."""


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a file, else a :class:`DatasetError` naming ``what`` belongs there."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing {path}: put {what} there (nothing is downloaded)")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"missing directory {path}: put {what} there (nothing is downloaded)")
    return path


def read_json(path: str | Path, what: str) -> Any:
    path = require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); expected {what}") from error


def field(entry: Any, key: str, path: Path, where: str) -> Any:
    """``entry[key]``, or a :class:`DatasetError` saying which entry of which file lacks it."""
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{path}: {where} has no {key!r} field")
    return entry[key]
