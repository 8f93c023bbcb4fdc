"""The project's own JSON and Parquet files, read so that a damaged one is one line.

Each read names the file, what is wrong with it and what to do (``hint``), as a
:class:`UserError`, instead of a JSON or Arrow traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.errors import UserError


def read_json(path: Path, hint: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object holding at least ``keys``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); {hint}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {hint}") from None
    missing = [k for k in keys if not isinstance(value, dict) or k not in value]
    if not isinstance(value, dict) or missing:
        raise UserError(f"{path}: expected a JSON object with {', '.join(keys) or 'fields'}"
                        f"{f' (missing {missing[0]!r})' if missing and isinstance(value, dict) else ''}; {hint}")
    return value


def read_parquet(path: Path, hint: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet table (only ``columns`` if given)."""
    try:
        return pd.read_parquet(path, columns=columns)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable Parquet table ({first}); {hint}") from None
