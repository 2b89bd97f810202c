"""The store's on-disk format: constants, the shard schema, record keys, manifest and failure files.

Shared by the reader (`distill.store.reader`) and the writer (`distill.store.writer`); imports
neither, so they do not import each other. The format is described in docs/store.md.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distill.store"
VERSION = 2
"""Version 2 added the byte columns (``completion_token_bytes``, ``topk_bytes``) and the manifest's
``topk_kind``; version-1 stores stay readable (`READABLE`)."""
READABLE = (1, 2)
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
SHARD_GLOB = "shard-*.parquet"
IGNORE = -100
"""Label of positions that are not trained on (prompt tokens), as in PyTorch's cross-entropy."""
FLOAT16_MIN = float(np.finfo(np.float16).min)

_COLUMNS = (
    "key",
    "id",
    "prompt",
    "is_chat",
    "completion",
    "finish_reason",
    "prompt_token_ids",
    "completion_token_ids",
    "topk_ids",
    "topk_logprobs",
    "prompt_tokens",
    "completion_tokens",
)
"""The columns every shard has (version 1 and 2)."""
V2_COLUMNS = ("completion_token_bytes", "topk_bytes")
"""Columns added by version 2 (nullable): absent from version-1 shards, read as None there."""


def schema():
    """The Arrow schema of a shard.

    ``topk_ids``/``topk_logprobs`` are byte blobs of row-major ``(n_completion, k)`` arrays:
    little-endian int32 ids and float16 log-probabilities (6·k bytes per token before compression).
    Blobs rather than Parquet lists: a list stores repetition levels per value, which makes reading
    several times slower; a blob is one value per record and decodes with ``np.frombuffer``.
    Version 2: ``completion_token_bytes`` (n items, the bytes of each generated token) and
    ``topk_bytes`` (row-major n*k items, the bytes of each top-k alternative, when the top-k came as
    strings from a hosted API: ``topk_ids`` is null then), both nullable."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("is_chat", pa.bool_()),
            ("completion", pa.string()),
            ("finish_reason", pa.string()),
            ("prompt_token_ids", pa.list_(pa.int32())),
            ("completion_token_ids", pa.list_(pa.int32())),
            ("topk_ids", pa.binary()),
            ("topk_logprobs", pa.binary()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("completion_token_bytes", pa.list_(pa.binary())),
            ("topk_bytes", pa.list_(pa.binary())),
        ]
    )


def topk_kind(manifest: dict[str, Any]) -> str | None:
    """``"ids"``, ``"bytes"`` or None (no top-k: text only) for a manifest; a version-1 manifest reads
    as ``"ids"`` when k > 0."""
    if "topk_kind" in manifest:
        return manifest["topk_kind"]
    return "ids" if int(manifest.get("k") or 0) > 0 else None


def canonical(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 (hex) of a store's setup: ``{"teacher", "tokenizer", "settings", "k", "capture_temperature"}``."""
    return hashlib.sha256(canonical(config).encode("utf-8")).hexdigest()


def record_key(cfg_hash: str, prompt: str | None, messages: Any, user_id: str | None) -> str:
    """The content hash naming a record: setup hash + prompt text or messages + the user's id (if any).

    32 hex digits (128 bits). Any change of model, settings, k or prompt text gives another key."""
    body = canonical({"setup": cfg_hash, "prompt": prompt, "messages": messages, "id": user_id})
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]


def _shard_ok(path: Path, *, full: bool = False) -> bool:
    """A shard is usable when its Parquet footer reads, its columns are ours and every column chunk
    the footer lists lies inside the file (a torn write fails the first; data cut out of the middle
    of a file, the footer intact, fails the last). ``full``: also read every page, checking the page
    checksums that shards carry (flipped bytes fail here): what the writer does on opening."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        if not set(_COLUMNS) <= set(meta.schema.to_arrow_schema().names):
            return False
        with builtins.open(path, "rb") as f:  # the footer's own length sits 8 bytes from the end
            size = f.seek(0, 2)
            f.seek(size - 8)
            footer_start = size - 8 - int.from_bytes(f.read(4), "little")
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                if start is None or start + col.total_compressed_size > footer_start:
                    return False
        if full:
            pq.ParquetFile(path, page_checksum_verification=True).read(use_threads=False)
        return True
    except Exception:  # any unreadable file is a torn write: it is redone, not trusted
        return False


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of store ``path``: ``ValueError`` naming the file and the field when it is not one
    (not a JSON object, another format or version, a ``k``, ``capture_temperature`` or shard list of
    the wrong type)."""
    from distill.data import read_document

    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{path}: not a distill store (no {MANIFEST})")
    manifest = read_document(mpath, "store manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a distill store manifest (format {manifest.get('format')!r})")
    if manifest.get("version") not in READABLE:
        raise ValueError(
            f"{mpath}: store version {manifest.get('version')!r}, this distill reads versions "
            f"{', '.join(map(str, READABLE))}"
        )
    _check_manifest(mpath, manifest)
    return manifest


def _check_manifest(mpath: Path, m: dict[str, Any]) -> None:
    """The fields a reader relies on have the types it needs (a hand-edited manifest fails here, by name)."""
    k = m.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{mpath}: k must be an integer >= 0, got {k!r}")
    kind = m.get("topk_kind")
    if kind not in (None, "ids", "bytes"):
        raise ValueError(f"{mpath}: topk_kind must be 'ids', 'bytes' or null, got {kind!r}")
    t = m.get("capture_temperature", 1.0)
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf")):
        raise ValueError(f"{mpath}: capture_temperature must be a finite number > 0, got {t!r}")
    shards = m.get("shards", [])
    ok = isinstance(shards, list) and all(
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and isinstance(s.get("records"), int)
        and not isinstance(s.get("records"), bool)
        for s in shards
    )
    if not ok:
        raise ValueError(
            f"{mpath}: shards must be a list of {{'file': str, 'records': int}}, got {shards!r:.80}"
        )


def read_failures(path: str | Path) -> dict[str, dict[str, Any]]:
    """Failures logged in ``path/failures.jsonl``, latest per key. A torn (partial) last line is skipped."""
    fpath = Path(path) / FAILURES
    out: dict[str, dict[str, Any]] = {}
    if not fpath.is_file():
        return out
    # errors="replace": a line cut inside a multi-byte character is torn like any other last line.
    with builtins.open(fpath, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if isinstance(row, dict) and "key" in row:
                out[row["key"]] = row
    return out
