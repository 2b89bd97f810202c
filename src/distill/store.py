"""The teacher-output store: a directory of Parquet shards, ``manifest.json`` and ``failures.jsonl``.

Layout (format described in docs/store.md)::

    STORE/manifest.json         teacher identity, tokenizer, settings, capture temperature, k, counts, spend
    STORE/shard-000000.parquet  records, one row per answered prompt (`SCHEMA`)
    STORE/failures.jsonl        prompts whose request failed: retried by the next run, never training data
    STORE/.lock                 held (flock) by the one writer

Writing lives in `distill.store_writer` (`StoreWriter`, `completion_row`; also importable from
here): a shard is written to a temporary name, fsynced, renamed, and the directory fsynced, so a
shard is either complete or absent; `StoreWriter` deletes temporaries and unreadable (torn)
shards when it opens, and their prompts are answered again. A record's ``key`` is a content hash of
the store's whole setup (teacher, tokenizer, settings, k) and the prompt, so a record is joined to
its prompt by content, never by position.

Reading: `open` returns a `Store` that streams records shard by shard (one record batch in memory at
a time) and yields training-ready tensors with `Store.examples`.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distill.store"
VERSION = 1
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


def schema():
    """The Arrow schema of a shard.

    ``topk_ids``/``topk_logprobs`` are byte blobs of row-major ``(n_completion, k)`` arrays:
    little-endian int32 ids and float16 log-probabilities (6·k bytes per token before compression).
    Blobs rather than Parquet lists: a list stores repetition levels per value, which makes reading
    several times slower; a blob is one value per record and decodes with ``np.frombuffer``."""
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
        ]
    )


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


def _shard_ok(path: Path) -> bool:
    """A shard is usable when its Parquet footer reads and its columns are ours (a torn write fails)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        return set(_COLUMNS) <= set(meta.schema.to_arrow_schema().names)
    except Exception:  # any unreadable file is a torn write: it is redone, not trusted
        return False


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of store ``path`` (``ValueError`` naming the file when it is not one)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{path}: not a distill store (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{mpath}: not valid JSON ({err.msg})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: not a distill store manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{mpath}: store version {manifest.get('version')!r}, this distill reads {VERSION}")
    return manifest


def read_failures(path: str | Path) -> dict[str, dict[str, Any]]:
    """Failures logged in ``path/failures.jsonl``, latest per key. A torn (partial) last line is skipped."""
    fpath = Path(path) / FAILURES
    out: dict[str, dict[str, Any]] = {}
    if not fpath.is_file():
        return out
    with builtins.open(fpath, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if isinstance(row, dict) and "key" in row:
                out[row["key"]] = row
    return out


# --- reading ----------------------------------------------------------------------------------------


def __getattr__(name: str) -> Any:
    # The writer lives in its own module (which imports this one); re-exported lazily, no import cycle.
    if name in ("StoreWriter", "completion_row", "atomic_write_bytes"):
        from distill import store_writer

        return getattr(store_writer, name)
    raise AttributeError(f"module 'distill.store' has no attribute {name!r}")


def open(path: str | Path) -> Store:  # noqa: A001 - the public name the issue asks for
    """Open the store at ``path`` for reading (nothing is loaded until iterated)."""
    return Store(path)


class Store:
    """A read-only view of a store directory.

    ``manifest``: the manifest dict. ``len(store)``: records (from Parquet footers, cheap).
    Iterating yields record dicts (see `Store.__iter__`); `examples` yields training tensors.
    ``rejected``: counts of records `examples` left out, by reason.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no such store directory: {self.path}")
        self.manifest = read_manifest(self.path)
        self.k = int(self.manifest.get("k") or 0)
        self.shards = [p for p in sorted(self.path.glob(SHARD_GLOB)) if _shard_ok(p)]
        self.rejected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, records={len(self)}, k={self.k})"

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.shards)

    def batches(self, columns: Iterable[str] | None = None, batch_size: int = 4096) -> Iterator[Any]:
        """Arrow record batches of the shards in order, ``batch_size`` rows at a time (streaming)."""
        import pyarrow.parquet as pq

        cols = list(columns) if columns is not None else None
        for shard in self.shards:
            pf = pq.ParquetFile(shard)
            for g in range(pf.num_row_groups):  # one row group in memory at a time
                yield from pf.read_row_group(g, columns=cols, use_threads=False).to_batches(
                    max_chunksize=batch_size
                )

    def keys(self) -> list[str]:
        """Every record's key, in store order."""
        return [k for b in self.batches(["key"]) for k in b.column("key").to_pylist()]

    def failures(self) -> list[dict[str, Any]]:
        """Prompts that failed and are not in the store: ``{"key", "id", "error", "attempts", "time"}``."""
        done = set(self.keys())
        return [v for k, v in read_failures(self.path).items() if k not in done]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Records as dicts: ``key``, ``id``, ``prompt`` (str, or a list of messages for chats),
        ``completion``, ``finish_reason``, ``prompt_token_ids``, ``completion_token_ids`` (lists or None),
        ``topk_ids``/``topk_logprobs`` (``n_completion`` lists of k, or None), ``usage``."""
        k = self.k
        for batch in self.batches():
            for row in batch.to_pylist():
                for name, dtype in (("topk_ids", "<i4"), ("topk_logprobs", "<f2")):
                    blob = row[name]
                    row[name] = None if blob is None else np.frombuffer(blob, dtype).reshape(-1, k).tolist()
                if row.pop("is_chat"):
                    row["prompt"] = json.loads(row["prompt"])
                row["usage"] = {
                    "prompt_tokens": row.pop("prompt_tokens"),
                    "completion_tokens": row.pop("completion_tokens"),
                }
                yield row

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def examples(self, max_length: int | None = None, tokenizer: Any = None) -> Iterator[dict[str, Any]]:
        """Training-ready examples, streamed one record batch at a time.

        Each is ``{"id": str, "input_ids": (L,) long, "labels": (L,) long}`` plus, for records with
        top-k data, ``"topk_ids": (L, K) long, "topk_logprobs": (L, K) float32``. ``input_ids`` =
        prompt ids + completion ids; ``labels`` is -100 on prompt positions and the token id on
        completion positions; top-k row i is the teacher's distribution for the token at position i
        (given tokens < i), zero on prompt positions. ``max_length`` cuts sequences from the end; a
        record left without completion tokens is skipped. Records with NaN/inf log-probabilities are
        skipped. Skips are counted in ``self.rejected``. Records without token ids (a black-box API)
        are tokenised with ``tokenizer`` (chats through its chat template); without one they are an error.
        """
        import torch

        k = self.k
        cols = ["id", "prompt", "is_chat", "completion", "prompt_token_ids", "completion_token_ids"]
        cols += ["topk_ids", "topk_logprobs"]
        for batch in self.batches(cols):
            ids = batch.column("id").to_pylist()
            p_off, p_val, p_null = _list_parts(batch.column("prompt_token_ids"))
            c_off, c_val, c_null = _list_parts(batch.column("completion_token_ids"))
            t_off, t_buf, t_null = _blob_parts(batch.column("topk_ids"))
            l_off, l_buf, _ = _blob_parts(batch.column("topk_logprobs"))
            # One check for the whole batch; per record only when something is not finite.
            all_finite = bool(np.isfinite(np.frombuffer(l_buf, "<f2", count=len(l_buf) // 2)).all())
            for i, rid in enumerate(ids):
                if p_null[i] or c_null[i]:
                    prompt_ids, comp_ids = self._tokenize(batch, i, tokenizer)
                else:
                    prompt_ids = p_val[p_off[i] : p_off[i + 1]]
                    comp_ids = c_val[c_off[i] : c_off[i + 1]]
                P, C = len(prompt_ids), len(comp_ids)
                L = P + C if max_length is None else min(P + C, max_length)
                if L <= P:
                    self._reject("no completion tokens within max_length" if C else "empty completion")
                    continue
                input_ids = np.concatenate([prompt_ids, comp_ids]).astype(np.int64)[:L]
                labels = np.full(L, IGNORE, dtype=np.int64)
                labels[P:] = input_ids[P:]
                ex = {"id": rid, "input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
                if k and not t_null[i]:
                    n = (L - P) * k
                    if t_off[i + 1] - t_off[i] < 4 * C * k or l_off[i + 1] - l_off[i] < 2 * C * k:
                        self._reject("top-k data shorter than the completion")
                        continue
                    lp = np.frombuffer(l_buf, "<f2", count=n, offset=int(l_off[i]))
                    if not all_finite and not np.isfinite(lp).all():
                        self._reject("non-finite log-probabilities")
                        continue
                    top_ids = np.empty((L, k), dtype=np.int64)
                    top_lps = np.empty((L, k), dtype=np.float32)
                    top_ids[:P] = 0
                    top_lps[:P] = 0.0
                    top_ids[P:] = np.frombuffer(t_buf, "<i4", count=n, offset=int(t_off[i])).reshape(L - P, k)
                    top_lps[P:] = lp.reshape(L - P, k)
                    ex["topk_ids"] = torch.from_numpy(top_ids)
                    ex["topk_logprobs"] = torch.from_numpy(top_lps)
                yield ex

    def _tokenize(self, batch, i: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        rid = batch.column("id")[i].as_py()
        if tokenizer is None:
            raise ValueError(
                f"{self.path}: record {rid!r} has no token ids (a black-box teacher); pass a tokenizer"
            )
        prompt = batch.column("prompt")[i].as_py()
        if batch.column("is_chat")[i].as_py():
            text = tokenizer.apply_chat_template(
                json.loads(prompt), tokenize=False, add_generation_prompt=True
            )
            p = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            p = tokenizer(prompt)["input_ids"]
        c = tokenizer(batch.column("completion")[i].as_py(), add_special_tokens=False)["input_ids"]
        return np.asarray(p, dtype=np.int64), np.asarray(c, dtype=np.int64)


def _blob_parts(col) -> tuple[np.ndarray, Any, np.ndarray]:
    """(absolute byte offsets (n+1,), the data buffer, is-null (n,)) of an Arrow binary column."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(len(col), dtype=bool)
    _, offsets, data = col.buffers()
    offs = np.frombuffer(offsets, dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    return offs, (data if data is not None else b""), nulls


def _list_parts(col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets (n+1,), flat values, is-null (n,)) of an Arrow list column, without Python objects."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, dtype=bool)
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    # Offsets index into .values, which may start past 0 when the array is a slice.
    return offsets - offsets[0] if offsets.size else offsets, values[offsets[0] : offsets[-1]], nulls
