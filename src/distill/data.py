"""Input rows and files, shared by every stage: tables, a row's text, rows left out, durable writes.

`read_table` reads prompts, production inputs and training pairs (JSONL, JSON, CSV, Parquet);
`read_document` reads every JSON or TOML file of settings and state (store manifests, router files,
checkpoint state, prices, training configs) and `read_text` any text file, each with one clear
error naming the file (and the line) for a missing, undecodable or malformed file; `TEXT_COLUMNS` is the one order in which every command looks for a row's text; `content_text`
flattens OpenAI message content; `Exclusions` counts the rows a stage could not use, by reason,
so none is dropped silently. `fsync_file`, `fsync_dir` and
`atomic_write_bytes` are the one way the store and the checkpoints make a write survive a crash:
write a temporary file, fsync it, rename it over the final name, fsync the directory;
`OutputError` is how they say that a write failed (a read-only or full file system) and what
earlier output is intact.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TEXT_COLUMNS = ("prompt", "messages", "text", "input", "question")
"""Where a row's input text is looked for when no column is named, first match wins: plain text
(``prompt``, ``text``, ``input``, ``question``) or chat ``messages``."""


def decode_utf8(data: bytes, where: str | Path, first_line: int = 1) -> str:
    """``data`` decoded as UTF-8; ``ValueError`` naming ``where``, the line and the column of the first
    byte that is not UTF-8 (``first_line``: the line number of ``data``'s first line)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{where}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {col}); "
            "save the file as UTF-8"
        ) from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of file ``path``: ``FileNotFoundError`` "no such {what}: path" when it is not a
    file, ``ValueError`` naming the file and line for bytes that are not UTF-8 (`decode_utf8`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    return decode_utf8(path.read_bytes(), path)


def read_document(path: str | Path, what: str, *, toml: bool | None = None) -> dict[str, Any]:
    """The object in JSON file ``path`` (TOML when ``toml``; None: when its name ends in ``.toml``):
    the one reader of settings and state files. ``what`` names the kind of file in errors.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and the line)
    when it is not UTF-8, not valid JSON/TOML, nested too deeply, or not an object at the top."""
    path = Path(path)
    text = read_text(path, what)
    if toml or (toml is None and path.suffix.lower() == ".toml"):
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a {what}") from None
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ValueError(f"{path}: expected a JSON object (a {what}), got a {kind}")
    return data


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json``/``.csv``/``.parquet`` file as dicts, in file order.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and the line,
    for JSONL, CSV and bytes that are not UTF-8) for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_utf8(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                except RecursionError:
                    raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(read_text(path), newline=""))]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as err:  # damaged file, or strings that are not UTF-8
            raise ValueError(f"{path}: not a readable Parquet file ({str(err)[:200]})") from None
    raise ValueError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def require_columns(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first row that lacks one of ``columns``."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise ValueError(f"{source}: row {i} has no {', '.join(repr(m) for m in missing)} column")


def content_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or a list of parts
    ``[{"type": "text", "text": ...}, ...]`` joined by spaces (non-text parts contribute nothing)."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def messages_text(messages: Any) -> str:
    """A chat as one text, a ``"role: content"`` line per message (how chats are embedded and scouted)."""
    return "\n".join(f"{m.get('role', '')}: {content_text(m.get('content'))}" for m in messages)


class Exclusions:
    """Rows left out of a stage, counted by reason with a few examples each (never silently dropped)."""

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.by_reason: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, example: Any) -> None:
        """Count one row under ``reason``; keep ``example`` (JSON-able) if fewer than ``max_examples`` are kept."""
        entry = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append(example)

    @property
    def total(self) -> int:
        return sum(e["count"] for e in self.by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": self.by_reason}


class OutputError(OSError):
    """Output that could not be written (read-only or full file system, no permission). The message
    says what could not be written, why, and which earlier output is intact; ``errno`` is the cause's.
    `distill.cli.main` prints it as one line (exit 2)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def output_error(err: Exception, what: str, intact: str) -> OutputError:
    """An `OutputError` for ``err`` (an `OSError`, or a library's error wrapping one, such as
    safetensors'): "could not write {what} ({reason}: {file}); {intact}"."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, OSError):
        reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    else:
        reason = " ".join(str(err).split())[:200]
    return OutputError(f"could not write {what} ({reason}); {intact}", getattr(err, "errno", None))


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
