"""The teacher-output store: a directory of Parquet shards, ``manifest.json`` and ``failures.jsonl``.

Layout (format described in docs/store.md)::

    STORE/manifest.json         teacher identity, tokenizer, settings, capture temperature, k, counts, spend
    STORE/shard-000000.parquet  records, one row per answered prompt (`SCHEMA`)
    STORE/failures.jsonl        prompts whose request failed: retried by the next run, never training data
    STORE/.lock                 held (flock) by the one writer

Writing lives in `distill.store.writer` (`StoreWriter`, `completion_row`; also importable from
here): a shard is written to a temporary name, fsynced, renamed, and the directory fsynced, so a
shard is either complete or absent; `StoreWriter` deletes temporaries and unreadable (torn)
shards when it opens, and their prompts are answered again. A record's ``key`` is a content hash of
the store's whole setup (teacher, tokenizer, settings, k) and the prompt, so a record is joined to
its prompt by content, never by position.

Reading: `open` returns a `Store` that streams records shard by shard (one record batch in memory at
a time) and yields training-ready tensors with `Store.examples`.

Owns: the format (`format.py`), reading (`reader.py`), writing (`writer.py`) and asking a teacher
resumably (`generate.py`, behind ``distill generate``).
May import: the shared modules and `distill.models`.
"""

from distill.store.format import (
    FAILURES,
    FLOAT16_MIN,
    FORMAT,
    IGNORE,
    MANIFEST,
    SHARD_GLOB,
    VERSION,
    canonical,
    config_hash,
    read_failures,
    read_manifest,
    record_key,
    schema,
)
from distill.store.reader import Store, open
from distill.store.writer import StoreWriter, atomic_write_bytes, completion_row

__all__ = [
    "FAILURES",
    "FLOAT16_MIN",
    "FORMAT",
    "IGNORE",
    "MANIFEST",
    "SHARD_GLOB",
    "VERSION",
    "Store",
    "StoreWriter",
    "atomic_write_bytes",
    "canonical",
    "completion_row",
    "config_hash",
    "open",
    "read_failures",
    "read_manifest",
    "record_key",
    "schema",
]
