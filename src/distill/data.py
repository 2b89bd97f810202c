"""Files in and out, shared by every stage: tables (JSONL, JSON, CSV, Parquet) and durable writes.

`read_table` reads prompts, production inputs and training pairs. `fsync_file`, `fsync_dir` and
`atomic_write_bytes` are the one way the store and the checkpoints make a write survive a crash:
write a temporary file, fsync it, rename it over the final name, fsync the directory.
"""

from __future__ import annotations

import csv
import json
import os
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


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush directory ``path``'s entries (a rename or new file in it) to disk.

    Where the platform cannot open a directory (``OSError`` on open) this does nothing: the rename
    itself is still atomic, only its durability across a power cut is then the file system's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename (then fsync the directory):
    a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
