"""OpenAI response shapes for `distill serve`: one choice of /v1/completions or /v1/chat/completions.

Besides OpenAI's fields every choice carries distill's token-id extension (also read by vLLM-style
clients): ``prompt_token_ids``, ``token_ids`` (the completion, including a final end-of-sequence
token when ``finish_reason`` is "stop"), and, when log-probabilities were asked for,
``top_token_ids`` ((n_tokens, k) ids aligned with the ``top_logprobs`` entries). Log-probability
entries are one per completion token id, so the end-of-sequence token has one too (its text is
not part of ``text``/``content``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from distill.teachers.hf import Generation

LOGPROB_FLOOR = -9999.0
"""Stands in for -inf (a token of probability 0), which JSON cannot carry; OpenAI uses the same value."""


def _lp(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def _token_ids(g: Generation) -> dict:
    c = g.completion
    return {"prompt_token_ids": c.prompt_token_ids, "token_ids": c.completion_token_ids}


def _tops(g: Generation, k: int) -> tuple[list[list[int]], list[list[float]]]:
    c = g.completion
    n = len(c.completion_token_ids or [])
    if not k or c.top_ids is None or c.top_logprobs is None:
        return [[] for _ in range(n)], [[] for _ in range(n)]
    return c.top_ids, [[_lp(v) for v in row] for row in c.top_logprobs]


def completion_choice(index: int, g: Generation, token_bytes: Callable[[int], bytes], k: int | None) -> dict:
    """A /v1/completions choice; ``k`` is the request's ``logprobs`` (None: no log-probabilities).

    ``logprobs`` is the legacy shape ``{tokens, token_logprobs, top_logprobs: [{token: logprob}],
    text_offset}``; ``text_offset`` counts characters from the start of the completion text.
    """
    c = g.completion
    choice = {"index": index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    choice.update(_token_ids(g))
    if k is not None:
        ids = c.completion_token_ids or []
        tokens = [token_bytes(t).decode("utf-8", errors="replace") for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        top_ids, top_lps = _tops(g, k)
        top = []
        for row_ids, row_lps in zip(top_ids, top_lps):
            entry: dict[str, float] = {}
            for i, lp in zip(row_ids, row_lps):  # two ids with the same text: keep the likelier
                entry.setdefault(token_bytes(i).decode("utf-8", errors="replace"), lp)
            top.append(entry)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": [_lp(v) for v in g.token_logprobs],
            "top_logprobs": top,
            "text_offset": offsets,
        }
        choice["top_token_ids"] = top_ids
    return choice


def _entry(token_id: int, logprob: float, token_bytes: Callable[[int], bytes]) -> dict:
    raw = token_bytes(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": _lp(logprob), "bytes": list(raw)}


def chat_choice(index: int, g: Generation, token_bytes: Callable[[int], bytes], k: int | None) -> dict:
    """A /v1/chat/completions choice; ``k`` is ``top_logprobs`` when ``logprobs`` is true, else None.

    ``logprobs`` is ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
    """
    c = g.completion
    choice = {
        "index": index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": None,
        "finish_reason": c.finish_reason,
    }
    choice.update(_token_ids(g))
    if k is not None:
        top_ids, top_lps = _tops(g, k)
        content = []
        for tok, lp, row_ids, row_lps in zip(
            c.completion_token_ids or [], g.token_logprobs, top_ids, top_lps
        ):
            entry = _entry(tok, lp, token_bytes)
            entry["top_logprobs"] = [_entry(i, v, token_bytes) for i, v in zip(row_ids, row_lps)]
            content.append(entry)
        choice["logprobs"] = {"content": content, "refusal": None}
        choice["top_token_ids"] = top_ids
    return choice
