"""Aligning two tokenizations of one text by byte offsets (cross-tokenizer distillation).

The teacher's completion is a sequence of teacher tokens, the student's the same text in student
tokens; each token covers a byte span of the text's UTF-8 bytes (`distill.models.token_bytes`). A
student position is *aligned* when the byte offset where its token starts is also where a teacher
token starts: both models then predict "what comes next" from the same text, and the teacher's
distribution there can be turned into a target for the student. Everything here is numpy over whole
sequences (cumulative sums and one ``searchsorted``), no per-token Python.
"""

from __future__ import annotations

import numpy as np


def stream_lead(stream: bytes, text: bytes) -> int | None:
    """How many bytes a token stream spells before the text: 0 when ``stream == text``, 1 when a
    SentencePiece dummy-prefix space comes first (``b" " + text``); ``None`` when they disagree
    otherwise (normalisation, unknown tokens: the tokens do not spell the text, nothing aligns)."""
    if stream == text:
        return 0
    if len(stream) == len(text) + 1 and stream[:1] == b" " and stream[1:] == text:
        return 1
    return None


def prefix_lead(stream: bytes, text: bytes) -> int | None:
    """As `stream_lead`, for tokens that may spell only the start of the text (a truncated example)."""
    if text.startswith(stream):
        return 0
    if stream[:1] == b" " and text.startswith(stream[1:]):
        return 1
    return None


def token_starts(lengths: np.ndarray, lead: int = 0) -> np.ndarray:
    """Byte offset in the text where each token starts, ``(n,)`` int64, from the tokens' byte lengths
    ``(n,)``. ``lead`` bytes spelled before the text (a dummy prefix) are taken off; a token that
    started there starts at 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return np.maximum(starts - lead, 0)


def align(teacher_starts: np.ndarray, teacher_ok: np.ndarray, student_starts: np.ndarray) -> np.ndarray:
    """For each student position, the teacher position that starts at the same byte offset, else -1.

    ``teacher_starts`` ``(n,)`` nondecreasing byte offsets; ``teacher_ok`` ``(n,)`` bool, the teacher
    positions that may be aligned (not special tokens, except the end-of-sequence token, which starts
    where the text ends); ``student_starts`` ``(m,)``. When several eligible teacher tokens start at one
    offset, the first counts. Returns ``(m,)`` int64.
    """
    eligible = np.flatnonzero(np.asarray(teacher_ok, dtype=bool))
    out = np.full(len(student_starts), -1, dtype=np.int64)
    if not len(eligible) or not len(student_starts):
        return out
    offsets, first = np.unique(np.asarray(teacher_starts)[eligible], return_index=True)
    s = np.asarray(student_starts, dtype=np.int64)
    idx = np.searchsorted(offsets, s).clip(max=len(offsets) - 1)
    hit = offsets[idx] == s
    out[hit] = eligible[first[idx[hit]]]
    return out


def char_start(text: bytes, offset: int) -> int:
    """The start of the UTF-8 character holding byte ``offset`` (``offset`` itself at a boundary)."""
    while 0 < offset < len(text) and (text[offset] & 0xC0) == 0x80:
        offset -= 1
    return offset


__all__ = ["align", "char_start", "prefix_lead", "stream_lead", "token_starts"]
