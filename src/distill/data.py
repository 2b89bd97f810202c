"""Reading tabular inputs (prompts, production inputs, training pairs) from JSONL, JSON, CSV or Parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json``/``.csv``/``.parquet`` file as dicts, in file order.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and the line,
    for JSONL) for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first row that lacks one of ``columns``."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise ValueError(f"{source}: row {i} has no {', '.join(repr(m) for m in missing)} column")
