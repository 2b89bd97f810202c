"""The bytes each token of a vocabulary stands for: what cross-tokenizer alignment compares.

Two tokenizers agree on nothing but the text, so every token id is turned into the UTF-8 bytes it
contributes to the text. The conventions real tokenizers use:

- byte-level BPE (GPT-2, Llama 3, Qwen, Tekken): each character of a token string stands for one
  byte (``Ġ`` is the space byte 0x20), mapped back through the inverse of GPT-2's ``bytes_to_unicode``;
- SentencePiece / Metaspace (Llama 2, Mistral v1): ``▁`` is a space; byte-fallback pieces ``<0xE2>``
  are the single byte 0xE2 (a ``€`` may be three such pieces);
- special tokens (``<s>``, ``</s>``, ``<|assistant|>``...) stand for no bytes of the text: ``b""``;
  other added tokens stand for their content.

A SentencePiece tokenizer also prepends a space to the text it encodes (the "dummy prefix"), so its
tokens of ``"blue sky"`` spell ``b" blue sky"``; `distill.train.align` accounts for that.
WordPiece vocabularies (``##``) are refused: their tokens do not spell the text byte for byte.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass(frozen=True, eq=False)
class TokenBytes:
    """Every id of a tokenizer and the bytes it stands for."""

    table: list[bytes]
    """``table[id]``: the token's bytes (``b""`` for special tokens and for ids the tokenizer lacks)."""
    lengths: np.ndarray
    """``(V,)`` int64: ``len(table[id])``, for vectorised offsets."""
    special: np.ndarray
    """``(V,)`` bool: special tokens (and gaps in the id range)."""
    eos_ids: frozenset[int]
    """The end-of-sequence id(s): the one special token that maps across tokenizers (to the other's EOS)."""
    kind: str
    """``byte_level`` or ``metaspace``."""
    dummy_prefix: bool
    """The tokenizer prepends a space to the text it encodes (SentencePiece)."""
    by_bytes: dict[bytes, int] = field(repr=False)
    """Bytes -> the id that stands for exactly them (non-special; the first non-byte-fallback id when several do)."""

    @property
    def eos_id(self) -> int | None:
        return min(self.eos_ids) if self.eos_ids else None

    def __len__(self) -> int:
        return len(self.table)


def _kind(spec: dict, name: str) -> tuple[str, bool, bool]:
    """(``byte_level``/``metaspace``, byte fallback, dummy prefix) from a tokenizer.json dict."""
    text = json.dumps({k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece" or '"WordPiece"' in text:
        raise ValueError(f"tokenizer {name!r} is WordPiece: its tokens do not spell the text byte for byte")
    if '"ByteLevel"' in text:
        return "byte_level", False, False
    dummy = '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text or '"Prepend"' in text
    return "metaspace", bool(model.get("byte_fallback")), dummy


def _backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast (`tokenizers`) tokenizer; "
            "cross-tokenizer distillation needs one"
        )
    return backend


_BY_OBJECT: dict[int, tuple[weakref.ref, TokenBytes]] = {}


def token_bytes(tokenizer) -> TokenBytes:
    """The `TokenBytes` of a `transformers` fast tokenizer (cached per tokenizer object, and per vocabulary:
    building one for a 131k vocabulary takes seconds)."""
    from distill.models.identity import vocab_hash

    hit = _BY_OBJECT.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    backend = _backend(tokenizer)
    key = vocab_hash(tokenizer) + str(sorted(getattr(tokenizer, "all_special_ids", []) or []))
    tb = _cached(key, backend.to_str(), tuple(getattr(tokenizer, "all_special_ids", []) or ()),
                 getattr(tokenizer, "eos_token_id", None), str(getattr(tokenizer, "name_or_path", "")))  # fmt: skip
    try:
        _BY_OBJECT[id(tokenizer)] = (weakref.ref(tokenizer), tb)
    except TypeError:  # not weak-referenceable: the vocabulary cache still holds it
        pass
    return tb


@lru_cache(maxsize=8)
def _cached(key: str, spec_json: str, special_ids: tuple[int, ...], eos, name: str) -> TokenBytes:
    del key  # the cache key only
    spec = json.loads(spec_json)
    kind, byte_fallback, dummy = _kind(spec, name)
    vocab: dict[str, int] = dict((spec.get("model") or {}).get("vocab") or {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {p: i for i, (p, _) in enumerate(vocab)}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    size = max([*vocab.values(), *added, -1]) + 1
    table = [b""] * size
    special = np.ones(size, dtype=bool)  # gaps count as special: they stand for nothing
    fallback = np.zeros(size, dtype=bool)
    dec = _byte_decoder()
    for piece, i in vocab.items():
        if kind == "byte_level":
            try:
                table[i] = bytes(dec[c] for c in piece)
            except KeyError:  # a piece outside the byte alphabet (an unknown token): its text
                table[i] = piece.encode("utf-8")
        else:
            m = _BYTE_FALLBACK.fullmatch(piece) if byte_fallback else None
            table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
            fallback[i] = m is not None
        special[i] = False
    for i, a in added.items():
        is_special = bool(a.get("special")) or i in special_ids
        table[i] = b"" if is_special else str(a["content"]).encode("utf-8")
        special[i] = is_special
    for i in special_ids:
        if 0 <= i < size:
            table[i], special[i] = b"", True
    eos_ids = frozenset([int(eos)] if eos is not None else [])
    by_bytes: dict[bytes, int] = {}
    # Prefer the piece a tokenizer emits over its byte-fallback twin (SentencePiece's "▁" vs "<0x20>").
    for i in sorted(range(size), key=lambda i: (bool(fallback[i]), i)):
        if not special[i] and table[i] and table[i] not in by_bytes:
            by_bytes[table[i]] = i
    lengths = np.fromiter((len(b) for b in table), dtype=np.int64, count=size)
    return TokenBytes(table, lengths, special, eos_ids, kind, dummy, by_bytes)


__all__ = ["TokenBytes", "token_bytes"]
