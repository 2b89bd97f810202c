"""Reading a store: `open` returns a `Store` that streams records shard by shard and yields training tensors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distill.store.format import (
    IGNORE,
    MANIFEST,
    SHARD_GLOB,
    V2_COLUMNS,
    _shard_ok,
    read_failures,
    read_manifest,
    topk_kind,
)

# --- reading ----------------------------------------------------------------------------------------


def open(path: str | Path, *, allow_partial: bool = False) -> Store:  # noqa: A001 - the public name
    """Open the store at ``path`` for reading (nothing is loaded until iterated); see `Store`."""
    return Store(path, allow_partial=allow_partial)


class Store:
    """A read-only view of a store directory.

    ``manifest``: the manifest dict. ``len(store)``: records (from Parquet footers, cheap).
    Iterating yields record dicts (see `Store.__iter__`); `examples` yields training tensors.
    ``rejected``: counts of records `examples` left out, by reason.

    Damaged shards: what can be read is compared with the shards and record counts the manifest
    lists; a store missing any of them is refused (`ValueError` naming the store, the shards and how
    many records are lost), on opening or, for pages that fail their checksum, while reading.
    ``allow_partial=True`` goes on without them and counts them in ``lost`` (``{shard: records}``).
    """

    def __init__(self, path: str | Path, *, allow_partial: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no such store directory: {self.path}")
        self.manifest = read_manifest(self.path)
        self.k = int(self.manifest.get("k") or 0)
        self.topk_kind = topk_kind(self.manifest)
        """``"ids"``, ``"bytes"`` (a hosted API's top-k as strings) or None (text only)."""
        self.retokenized = 0
        """Records `examples` tokenised from their text (the teacher gave no token ids)."""
        self.allow_partial = allow_partial
        self.shards = [p for p in sorted(self.path.glob(SHARD_GLOB)) if _shard_ok(p)]
        self.rejected: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard the manifest lists is readable with its records (else refuse, or count them lost)."""
        import pyarrow.parquet as pq

        rows = {p.name: pq.read_metadata(p).num_rows for p in self.shards}
        lost: dict[str, tuple[int, str]] = {}
        for entry in self.manifest.get("shards", []):
            name, want = entry["file"], entry["records"]
            if name not in rows:
                why = "unreadable (damaged or cut)" if (self.path / name).exists() else "missing"
                lost[name] = (want, why)
            elif rows[name] < want:
                lost[name] = (want - rows[name], f"{rows[name]} of {want} records")
        for name, (n, why) in lost.items():
            self._lose(name, n, why)

    def _lose(self, shard: str, records: int, why: str) -> None:
        if not self.allow_partial:
            total = sum(int(e["records"]) for e in self.manifest.get("shards", []))
            raise ValueError(
                f"store {self.path}: {shard} {why}: {records} of the {total} records {MANIFEST} lists "
                "cannot be read; re-run `distill generate` with the same prompts and --out to redo them, "
                "or go on without them "
                "(distill train --allow-partial-store)"
            )
        self.lost[shard] = records  # set, not added: `batches` may run more than once

    @property
    def lost_records(self) -> int:
        """Records the manifest lists that could not be read (only with ``allow_partial``)."""
        return sum(self.lost.values())

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, records={len(self)}, k={self.k})"

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.shards)

    def batches(self, columns: Iterable[str] | None = None, batch_size: int = 4096) -> Iterator[Any]:
        """Arrow record batches of the shards in order, ``batch_size`` rows at a time (streaming)."""
        import pyarrow.parquet as pq

        wanted = list(columns) if columns is not None else None
        for shard in self.shards:
            # Shards carry page checksums: flipped bytes fail here instead of reading as wrong values.
            pf = pq.ParquetFile(shard, page_checksum_verification=True)
            names = set(pf.schema_arrow.names)
            # Version-1 shards lack the byte columns: left out here, read as None by `__iter__`.
            cols = None if wanted is None else [c for c in wanted if c in names or c not in V2_COLUMNS]
            for g in range(pf.num_row_groups):  # one row group in memory at a time
                try:
                    table = pf.read_row_group(g, columns=cols, use_threads=False)
                except Exception as err:  # noqa: BLE001 - decoding errors of any kind mean damaged data
                    n = pf.metadata.row_group(g).num_rows
                    self._lose(f"{shard.name} row group {g}", n, f"unreadable ({_one_line(err)})")
                    continue
                yield from table.to_batches(max_chunksize=batch_size)

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
        ``topk_ids``/``topk_logprobs`` (``n_completion`` lists of k, or None), ``completion_token_bytes``
        (list of bytes or None), ``topk_bytes`` (``n_completion`` lists of k bytes, or None), ``usage``."""
        k = self.k
        for batch in self.batches():
            for row in batch.to_pylist():
                for name, dtype in (("topk_ids", "<i4"), ("topk_logprobs", "<f2")):
                    blob = row[name]
                    row[name] = None if blob is None else np.frombuffer(blob, dtype).reshape(-1, k).tolist()
                row.setdefault("completion_token_bytes", None)
                flat = row.get("topk_bytes")
                row["topk_bytes"] = (
                    None if flat is None else [flat[i : i + k] for i in range(0, len(flat), k)]
                )
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
        are tokenised with ``tokenizer`` (chats through its chat template), with the tokenizer's EOS appended
        when the finish reason is ``stop`` (so a student learns to stop); each is counted in
        ``self.retokenized``. Without a tokenizer they are an error. Records with token ids use them as
        given (vLLM's and distill's already end with the EOS when they stopped).
        """
        import torch

        k = self.k
        cols = ["id", "prompt", "is_chat", "completion", "finish_reason", "prompt_token_ids"]
        cols += ["completion_token_ids"]
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
        c = list(tokenizer(batch.column("completion")[i].as_py(), add_special_tokens=False)["input_ids"])
        eos = getattr(tokenizer, "eos_token_id", None)
        if batch.column("finish_reason")[i].as_py() == "stop" and eos is not None and (not c or c[-1] != eos):
            c.append(int(eos))  # the answer ended: train the student to end it too
        self.retokenized += 1
        return np.asarray(p, dtype=np.int64), np.asarray(c, dtype=np.int64)


def _one_line(err: Exception) -> str:
    """A library's error text on one line, printable characters only (a corrupt page's bytes may be in it)."""
    text = "".join(c if c.isprintable() else " " for c in str(err))
    return " ".join(text.split())[:120]


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
