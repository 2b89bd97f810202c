"""Fingerprints of a local model, for teacher identities: a changed model never reuses a stored record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def vocab_hash(tokenizer) -> str:
    """sha256 (hex) of the tokenizer's vocabulary as a sorted ``[[token, id], ...]`` JSON list.

    Two tokenizers with the same hash map every token string to the same id (added tokens included).
    """
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def text_hash(text: Any) -> str | None:
    """sha256 (hex) of any JSON-able value (a chat template), or None for None."""
    if text is None:
        return None
    return hashlib.sha256(json.dumps(text, sort_keys=True).encode("utf-8")).hexdigest()


def weights_fingerprint(model_dir: str | Path, *, samples: int = 256, chunk: int = 16384) -> str:
    """sha256 (hex) over each safetensors file's name, size, header and ``samples`` evenly spaced chunks.

    Reads about ``samples * chunk`` bytes per file (4 MiB by default), not the whole checkpoint:
    retrained or merged weights change sampled bytes with near certainty (a LoRA merge touching 15%
    of the bytes escapes 256 samples with probability below 1e-17), so this tells checkpoints apart
    without hashing gigabytes. Not a cryptographic guarantee against crafted files.
    """
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(model_dir)!r}")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, size)))  # tensor names, dtypes, shapes, offsets
            start = 8 + header_len
            span = max(size - start - chunk, 0)
            for i in range(samples):
                fh.seek(start + span * i // max(samples - 1, 1))
                h.update(fh.read(chunk))
    return h.hexdigest()
