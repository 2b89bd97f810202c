"""Writing a store: `StoreWriter` (the one writer of a store directory) and `completion_row`.

Every file is committed with the same durable sequence: write a temporary name, flush, fsync,
rename over the final name, fsync the directory (`atomic_write_bytes`). See `distill.store` for
the format and docs/store.md for the crash-safety design.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import OutputError, atomic_write_bytes, fsync_dir, output_error
from distill.store.format import (
    FAILURES,
    FLOAT16_MIN,
    FORMAT,
    MANIFEST,
    SHARD_GLOB,
    VERSION,
    _shard_ok,
    canonical,
    config_hash,
    read_failures,
    read_manifest,
    schema,
    topk_kind,
)


def completion_row(key: str, user_id: str, prompt: str | None, messages: Any, c, k: int) -> dict[str, Any]:
    """A shard row from a `Completion` (``c``). Raises ``ValueError`` for top-k data of the wrong shape
    or with NaN/inf log-probabilities (such an answer is a failure, never training data).

    Top-k as ids (``c.top_ids``: local teachers, vLLM, distill serve) goes to ``topk_ids``; top-k as
    bytes (``c.top_bytes``: hosted APIs) to ``topk_bytes`` (row-major n*k), ``topk_ids`` null."""
    ids = lps = top_bytes = None
    comp_bytes = getattr(c, "completion_token_bytes", None)
    by_bytes = getattr(c, "top_bytes", None) is not None and c.top_ids is None
    n = len(c.completion_token_ids) if c.completion_token_ids is not None else len(comp_bytes or [])
    if k and c.top_logprobs is not None and (by_bytes or (c.top_ids is not None and c.completion_token_ids)):
        lps_a = np.asarray(c.top_logprobs, dtype=np.float64).reshape(-1)
        if by_bytes:
            top_bytes = [bytes(b) for row in c.top_bytes if len(row) == k for b in row]
            got = len(top_bytes) if len(c.top_bytes) == n else -1
        else:
            ids_a = np.asarray(c.top_ids, dtype=np.int64).reshape(-1)
            got = ids_a.size
        if got != n * k or lps_a.size != n * k:
            raise ValueError(f"prompt {user_id!r}: top-k data of {got} values, expected {n} tokens x k={k}")
        if not np.isfinite(lps_a).all():
            raise ValueError(f"prompt {user_id!r}: the teacher returned non-finite log-probabilities")
        # float16 cannot hold log-probabilities below -65504; they are probabilities of ~0 anyway.
        ids = None if by_bytes else ids_a.astype("<i4").tobytes()
        lps = np.maximum(lps_a, FLOAT16_MIN).astype("<f2").tobytes()
    usage = c.usage or {}
    return {
        "key": key,
        "id": user_id,
        "prompt": prompt if messages is None else canonical(list(messages)),
        "is_chat": messages is not None,
        "completion": c.text,
        "finish_reason": c.finish_reason,
        "prompt_token_ids": c.prompt_token_ids,
        "completion_token_ids": c.completion_token_ids,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "prompt_tokens": int(usage.get("prompt_tokens", len(c.prompt_token_ids or []))),
        "completion_tokens": int(usage.get("completion_tokens", n)),
        "completion_token_bytes": None if comp_bytes is None else [bytes(b) for b in comp_bytes],
        "topk_bytes": top_bytes,
    }


def row_topk_kind(row: dict[str, Any]) -> str | None:
    """``"ids"``, ``"bytes"`` or None: how a shard row (`completion_row`) holds its top-k."""
    if row.get("topk_ids") is not None:
        return "ids"
    return "bytes" if row.get("topk_bytes") is not None else None


class StoreWriter:
    """The one writer of a store directory (an exclusive ``flock`` on ``.lock``).

    Opening creates the store or checks that its setup (``config``) is the same; a store of another
    setup is refused (a changed model, temperature, k... must go to a new directory, so old records
    are never mixed in). It deletes temporary and torn shards, reconciles ``failures.jsonl`` with the
    stored keys, and knows which keys are done (`done`).
    """

    def __init__(self, path: str | Path, config: dict[str, Any]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} exists and is not a directory")
        self._lock = self._failures_file = None
        self._broken: OutputError | None = None  # the first failed write: later ones are not tried
        self.shards: list[dict[str, Any]] = []
        try:
            self._open(config)
        except BaseException as err:
            self._release()
            if isinstance(err, OSError):  # read-only, full, not permitted: one line, nothing asked yet
                n = len(list(self.path.glob(SHARD_GLOB)))
                why = f"nothing was sent to the teacher and the store's {n} shards were left as they are"
                raise output_error(err, f"store {self.path}", why) from None
            raise

    def _open(self, config: dict[str, Any]) -> None:
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = builtins.open(self.path / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"store {self.path} is being written by another process") from None
        self.config = config
        self.config_hash = config_hash(config)
        self.repaired: list[str] = []
        if (self.path / MANIFEST).exists():
            self.manifest = read_manifest(self.path)
            if self.manifest.get("config_hash") != self.config_hash:
                raise ValueError(_mismatch(self.path, self.manifest, config))
            # A version-1 store goes on as version 2 (its shards lack the byte columns: read as null).
            self.manifest["topk_kind"] = topk_kind(self.manifest)
            self.manifest["version"] = VERSION
        else:
            now = _now()
            self.manifest = {"format": FORMAT, "version": VERSION, "config_hash": self.config_hash}
            self.manifest.update(config)
            self.manifest["topk_kind"] = None  # set by the first answer with top-k: "ids" or "bytes"
            self.manifest.update(created=now, spent={"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0})
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink()
            self.repaired.append(f"removed temporary file {tmp.name}")
        self.done: set[str] = set()
        self.ids: dict[str, str] = {}  # record id -> key, to catch an id reused for another prompt
        listed = {e["file"]: e["records"] for e in self.manifest.get("shards", [])}
        for shard in sorted(self.path.glob(SHARD_GLOB)):
            # Every page is read (and its checksum checked): shards are small, answers are dear.
            if not _shard_ok(shard, full=True):
                shard.unlink()  # torn or damaged: its prompts are not in `done`, so they are redone
                was = (
                    f" ({listed[shard.name]} records; their prompts are asked again)"
                    if shard.name in listed
                    else ""
                )
                self.repaired.append(f"removed torn or damaged shard {shard.name}{was}")
                continue
            self._adopt(shard)
        self.failures = {k: v for k, v in read_failures(self.path).items() if k not in self.done}
        self._write_failures()
        self._write_manifest()
        self._failures_file = builtins.open(self.path / FAILURES, "a", encoding="utf-8")

    def _intact(self) -> str:
        n = sum(s["records"] for s in self.shards)
        return (
            f"the {len(self.shards)} shards committed before ({n} records) are intact; re-run the same "
            "command once the store can be written to ask only the rest"
        )

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Turn a failed write (read-only or full file system) into one `OutputError`; once one write
        has failed, later ones raise the same error instead of trying (no second, confusing error)."""
        if self._broken is not None:
            raise self._broken
        try:
            yield
        except OSError as err:
            self._broken = output_error(err, f"{what} in store {self.path}", self._intact())
            raise self._broken from None

    def _release(self) -> None:
        for f in (self._failures_file, self._lock):
            if f is not None:
                f.close()

    def _adopt(self, shard: Path) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        t = pq.read_table(
            shard, columns=["key", "id", "prompt_tokens", "completion_tokens"], use_threads=False
        )
        self.done.update(t.column("key").to_pylist())
        self.ids.update(zip(t.column("id").to_pylist(), t.column("key").to_pylist()))
        self.shards.append(
            {
                "file": shard.name,
                "records": t.num_rows,
                "prompt_tokens": int(pc.sum(t.column("prompt_tokens")).as_py() or 0),
                "completion_tokens": int(pc.sum(t.column("completion_tokens")).as_py() or 0),
            }
        )

    def write(self, rows: list[dict[str, Any]], spent: dict[str, float] | None = None) -> None:
        """Commit ``rows`` (from `completion_row`) as one new shard, then the manifest.

        ``spent``: tokens/cost spent since the last call (added to the manifest's ``spent``)."""
        import pyarrow as pa

        if spent:
            for name, value in spent.items():
                self.manifest["spent"][name] = self.manifest["spent"].get(name, 0) + value
        kinds = {row_topk_kind(r) for r in rows} - {None}
        have = self.manifest.get("topk_kind")
        if len(kinds | ({have} - {None})) > 1:
            raise ValueError(
                f"store {self.path} holds top-k as {have or 'mixed kinds'}; these answers bring "
                f"{', '.join(sorted(kinds))}: one store, one kind (use a new --out)"
            )
        if kinds and have is None:
            self.manifest["topk_kind"] = kinds.pop()
        if rows:
            seq = 1 + max((int(s["file"][6:12]) for s in self.shards), default=-1)
            final = self.path / f"shard-{seq:06d}.parquet"
            tmp = self.path / f".{final.name}.{os.getpid()}.tmp"
            table = pa.Table.from_pylist(rows, schema=schema())
            try:
                with self._writing(f"shard {final.name} ({len(rows)} answers, asked again by a re-run)"):
                    self._commit(table, tmp, final)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)  # no half-written temporary is left behind
            keys = {r["key"] for r in rows}
            self.done |= keys
            self.ids.update((r["id"], r["key"]) for r in rows)
            self.shards.append(
                {
                    "file": final.name,
                    "records": len(rows),
                    "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                    "completion_tokens": sum(r["completion_tokens"] for r in rows),
                }
            )
            if keys & self.failures.keys():  # answered now: drop its old failure (never both)
                self.failures = {k: v for k, v in self.failures.items() if k not in keys}
                with self._writing(FAILURES):
                    self._failures_file.close()
                    self._write_failures()
                    self._failures_file = builtins.open(self.path / FAILURES, "a", encoding="utf-8")
        with self._writing(MANIFEST):
            self._write_manifest()

    def _commit(self, table, tmp: Path, final: Path) -> None:
        import pyarrow.parquet as pq

        with builtins.open(tmp, "wb") as f:
            pq.write_table(
                table,
                f,
                compression="zstd",
                compression_level=9,
                use_dictionary=["id", "finish_reason"],
                write_page_checksum=True,  # readers detect flipped bytes (`_shard_ok`, `Store`)
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.path)

    def fail(self, key: str, user_id: str, error: str, attempts: int) -> None:
        """Log a failed prompt to ``failures.jsonl`` (one line, flushed and fsynced)."""
        row = {"key": key, "id": user_id, "error": error, "attempts": attempts, "time": _now()}
        self.failures[key] = row
        with self._writing(FAILURES):
            self._failures_file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._failures_file.flush()
            os.fsync(self._failures_file.fileno())

    def _write_failures(self) -> None:
        lines = "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in self.failures.values())
        atomic_write_bytes(self.path / FAILURES, lines.encode("utf-8"))

    def _write_manifest(self) -> None:
        self.manifest["shards"] = self.shards
        self.manifest["counts"] = {
            "records": sum(s["records"] for s in self.shards),
            "failed": len(self.failures),
            "shards": len(self.shards),
        }
        self.manifest["tokens"] = {
            "prompt": sum(s["prompt_tokens"] for s in self.shards),
            "completion": sum(s["completion_tokens"] for s in self.shards),
        }
        self.manifest["updated"] = _now()
        data = json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(self.path / MANIFEST, data.encode("utf-8"))

    def close(self) -> None:
        """Flush the manifest and release the lock (after a failed write, only release the lock).
        A second call does nothing."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if self._broken is None:
                with self._writing(MANIFEST):
                    self._write_manifest()
        finally:
            self._release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _mismatch(path: Path, manifest: dict[str, Any], config: dict[str, Any]) -> str:
    diffs = [
        f"{name}: {manifest.get(name)!r} -> {value!r}"
        for name, value in config.items()
        if canonical(manifest.get(name)) != canonical(value)
    ]
    return (
        f"store {path} holds answers from another setup ({'; '.join(diffs) or 'setup hash differs'}); "
        "its records would be stale for this run: use a new --out directory"
    )
