"""Tokens as they are decoded: what `HFTeacher.generate(..., on_token=...)` reports after each
step, so `distill serve` can stream an answer while it is being generated (the role
`transformers.TextIteratorStreamer` plays for ``model.generate``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """One generated token of one request, reported from the decoding thread."""

    index: int
    """Which request (its position in the list given to ``generate``)."""
    token_id: int
    text: str
    """The text this token adds to the answer: ``""`` while a UTF-8 character is incomplete (the
    next token's text carries it) and for a final end-of-sequence token (not part of the text)."""
    logprob: float
    """log p(token) at temperature 1, as in `distill.models.hf.Generation.token_logprobs`."""
    top_ids: list[int] | None = None
    """The step's top-k ids (None when no top-k was asked for)."""
    top_logprobs: list[float] | None = None


class IncrementalText:
    """Text pieces of a growing token sequence whose concatenation is ``decode(all ids)``.

    Each new token is decoded together with the tokens of the previous piece (so a tokenizer that
    treats the first token specially, e.g. SentencePiece's leading space, sees context), and its
    piece is held back while the text ends in an incomplete UTF-8 character (U+FFFD): the offsets
    scheme vLLM's incremental detokenizer uses."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""


def row_reporter(
    on_token: Callable[[Token], None],
    rows: list[int],
    decode: Callable[[list[int]], str],
    eos_ids: Collection[int],
) -> Callable[[int, int, float, list[int] | None, list[float] | None], None]:
    """A per-step callback for one decoded batch: row ``b`` is request ``rows[b]``; calls
    ``on_token`` with a `Token` whose text comes from an `IncrementalText` per row."""
    texts = [IncrementalText(decode) for _ in rows]

    def report(b: int, token_id: int, logprob: float, top_ids, top_logprobs) -> None:
        text = "" if token_id in eos_ids else texts[b].push(token_id)
        on_token(Token(rows[b], token_id, text, logprob, top_ids, top_logprobs))

    return report
