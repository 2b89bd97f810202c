"""Parsing OpenAI-compatible answers into `Completion`s: the shapes real servers send.

Three ways an endpoint gives token-level data, tried in this order for each choice:

1. **distill serve**: ``token_ids`` and ``top_token_ids`` (+ ``top_token_logprobs`` on completions)
   in the choice, ids aligned with the log-probabilities.
2. **vLLM** asked with ``return_token_ids: true`` and ``return_tokens_as_token_ids: true``:
   ``choice.token_ids`` (the completion, with the final EOS when it stopped), ``prompt_token_ids``
   (in the choice for completions, at the top level for chat), and every ``tokens`` /
   ``top_logprobs`` entry spelled ``"token_id:N"`` (legacy completions: one ``{"token_id:N": logprob}``
   dict per step, which may hold the sampled token as a (k+1)-th entry; chat: a list of
   ``{token, logprob, bytes}``). Top-k rows are sorted most probable first and cut to k.
3. **Hosted APIs** (OpenAI and look-alikes): chat ``logprobs.content[i] = {token, logprob, bytes,
   top_logprobs: [{token, logprob, bytes}]}``, or legacy completions ``tokens`` + ``top_logprobs``
   ``{string: logprob}`` dicts. No ids: the top-k is kept as the alternatives' **bytes**
   (``Completion.top_bytes``, from ``bytes`` or the string's UTF-8) and the completion's tokens as
   ``completion_token_bytes``. Entries whose strings collide are kept as separate entries (a chat list
   keeps them; a legacy dict has already merged them on the server: such a row is shorter than k and
   is padded with ``b""`` at log-probability −65504, probability 0).

An answer without log-probabilities is a text-only completion (plus ids, when the server gave them).
"""

from __future__ import annotations

import re
from typing import Any

from distill.models.base import Completion

PAD_LOGPROB = -65504.0
"""Log-probability of padding entries in a short top-k row (float16's lowest finite value: probability 0)."""

_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


def token_id(s: Any) -> int | None:
    """N from vLLM's ``"token_id:N"`` spelling (``return_tokens_as_token_ids``), else None."""
    m = _TOKEN_ID.match(s) if isinstance(s, str) else None
    return int(m.group(1)) if m else None


def _bytes(token: Any, raw: Any) -> bytes:
    """A token's bytes: the API's ``bytes`` list of ints when present, else the string's UTF-8."""
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    return str(token).encode("utf-8")


def _steps(logprobs: Any, chat: bool) -> list[tuple[str, bytes, list[tuple[str, bytes, float]]]] | None:
    """Per generated token: (its string, its bytes, [(alternative string, bytes, logprob), ...]) in the
    server's order; None when the answer carries no per-token log-probabilities."""
    if not isinstance(logprobs, dict):
        return None
    if chat:
        content = logprobs.get("content")
        if not isinstance(content, list):
            return None
        return [
            (
                str(e["token"]),
                _bytes(e["token"], e.get("bytes")),
                [
                    (str(a["token"]), _bytes(a["token"], a.get("bytes")), float(a["logprob"]))
                    for a in e.get("top_logprobs") or []
                ],
            )
            for e in content
        ]
    tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list):
        return None
    tops = tops if isinstance(tops, list) else [None] * len(tokens)
    return [
        (str(t), _bytes(t, None), [(str(s), _bytes(s, None), float(v)) for s, v in (d or {}).items()])
        for t, d in zip(tokens, tops)
    ]


def _topk(alts: list[tuple[Any, float]], k: int) -> list[tuple[Any, float]]:
    """The k most probable alternatives (stable: the server's order among equal values)."""
    return sorted(alts, key=lambda a: -a[1])[:k]


def parse_completion(rid: str, data: dict[str, Any], k: int, chat: bool) -> Completion:
    """A `Completion` from one response (see the module docstring). Raises KeyError/TypeError/ValueError
    for a body that is not an OpenAI-compatible answer (the caller turns them into `APIError`)."""
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    prompt_ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    comp_ids = choice.get("token_ids")
    lp = choice.get("logprobs")
    top_ids = top_lps = top_bytes = comp_bytes = None
    steps = _steps(lp, chat) if lp else None
    if k and comp_ids is not None and choice.get("top_token_ids") is not None and lp:
        top_ids, top_lps = _distill_topk(choice, lp, chat)
    elif steps is not None and steps and all(token_id(s[0]) is not None for s in steps):
        ids = [token_id(s[0]) for s in steps]
        comp_ids = comp_ids if comp_ids is not None else ids
        if k:
            rows = [_topk([(token_id(a[0]), a[2]) for a in s[2]], k) for s in steps]
            if all(r and all(i is not None for i, _ in r) for r in rows):
                top_ids = [[i for i, _ in r] for r in rows]
                top_lps = [[v for _, v in r] for r in rows]
    elif steps is not None:
        comp_bytes = [s[1] for s in steps]
        if k:
            rows = [_topk([(a[1], a[2]) for a in s[2]], k) for s in steps]
            if all(rows):
                pad = [(b"", PAD_LOGPROB)]
                rows = [r + pad * (k - len(r)) for r in rows]
                top_bytes = [[b for b, _ in r] for r in rows]
                top_lps = [[v for _, v in r] for r in rows]
    if top_ids is not None or top_bytes is not None:
        n = len(comp_ids) if top_ids is not None else len(comp_bytes)
        rows = top_ids if top_ids is not None else top_bytes
        if len(rows) != n or len(top_lps) != n or any(len(r) != k for r in rows + top_lps):
            top_ids = top_lps = top_bytes = None  # not recoverable: keep the completion without top-k
    usage = data.get("usage") or {}
    n_comp = len(comp_ids) if comp_ids is not None else len(comp_bytes or [])
    return Completion(
        id=rid,
        text=text if isinstance(text, str) else "",
        finish_reason=str(choice.get("finish_reason") or "unknown"),
        prompt_token_ids=[int(t) for t in prompt_ids] if prompt_ids is not None else None,
        completion_token_ids=[int(t) for t in comp_ids] if comp_ids is not None else None,
        top_ids=top_ids,
        top_logprobs=top_lps,
        usage={
            "prompt_tokens": int(usage.get("prompt_tokens", len(prompt_ids or []))),
            "completion_tokens": int(usage.get("completion_tokens", n_comp)),
        },
        completion_token_bytes=comp_bytes,
        top_bytes=top_bytes,
    )


def _distill_topk(choice: dict[str, Any], lp: dict[str, Any], chat: bool):
    """distill serve's ``top_token_ids`` with their values: ``top_token_logprobs`` when given, the chat
    list, or a legacy dict only when no two ids share a text (the dict has k entries then)."""
    top_ids = choice["top_token_ids"]
    if choice.get("top_token_logprobs") is not None:
        return top_ids, choice["top_token_logprobs"]
    if chat:
        return top_ids, [[e["logprob"] for e in tok["top_logprobs"]] for tok in lp["content"]]
    dicts = lp["top_logprobs"]
    if all(len(d) == len(row) for d, row in zip(dicts, top_ids)):
        return top_ids, [list(d.values()) for d in dicts]
    return None, None


def parse_prompt_logprobs(
    data: dict[str, Any], k: int
) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """``(prompt ids, top-k ids (P, k), top-k log-probabilities (P, k))`` from a vLLM completions answer
    to ``prompt_logprobs: k`` (``echo``-style scoring). vLLM gives, per prompt position, ``None`` for the
    first token and ``{"id": {"logprob", "rank", "decoded_token"}}`` for the others, holding the top k
    and the actual token (k+1 entries when it is not among them); rows are sorted and cut to k. Row 0
    (no distribution before the first token) is all zeros."""
    choice = data["choices"][0]
    ids = choice.get("prompt_token_ids") or data.get("prompt_token_ids")
    rows = choice.get("prompt_logprobs") or data.get("prompt_logprobs")
    if ids is None or rows is None or len(ids) != len(rows):
        raise ValueError("the answer has no prompt_logprobs with prompt_token_ids (not a vLLM endpoint?)")
    top_ids, top_lps = [], []
    for row in rows:
        if row is None:
            top_ids.append([0] * k)
            top_lps.append([0.0] * k)
            continue
        alts = _topk([(int(i), float(e["logprob"])) for i, e in row.items()], k)
        if len(alts) < k:
            raise ValueError(f"prompt_logprobs row with {len(alts)} entries, expected {k}")
        top_ids.append([i for i, _ in alts])
        top_lps.append([v for _, v in alts])
    return [int(t) for t in ids], top_ids, top_lps
