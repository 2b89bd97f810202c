"""What an OpenAI-compatible server is and can do: the checks `APITeacher.prepare` makes before the
first prompt is sent, the tokenizer it is known to use, and scoring token sequences through vLLM.

Server kind, from the ``/v1/models`` card (no flag): ``owned_by: "vllm"`` is vLLM (0.32 answers
``{"id", "object": "model", "owned_by": "vllm", "root", "max_model_len", "permission"}``),
``owned_by: "distill"`` is `distill serve`, anything else (or no card) is treated as a hosted API
(OpenAI and look-alikes: top-k as strings, at most 20 per token, no ids).

Limits of ``--top-k``: hosted APIs return at most `HOSTED_MAX_TOP_LOGPROBS`; vLLM's limit is its
``--max-logprobs`` (20 by default) and `distill serve`'s its own (20 by default): a one-token probe
request with ``logprobs=k`` (vLLM: always, once per store; `distill serve`: for k above 20) finds
out, and the server's refusal (vLLM: ``Requested sample logprobs of 21, which is
greater than max allowed: 20``) is put in the error, before any prompt is sent.

Tokenizer: a ``--teacher-tokenizer DIR`` is checked against the server on `PROBE` (vLLM: its
``/tokenize``; `distill serve`: the card's vocabulary hash); a mismatch names the first differing probe
token. Without a local copy, vLLM's tokenisation of `PROBE` is recorded as ``probe_hash``, which the
student's tokenizer is compared with at training time (`distill.train.vocab.check_store_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from distill.models.base import GenerationSettings
from distill.models.http import APIError

HOSTED_MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on ``top_logprobs`` (and what vLLM's ``--max-logprobs`` defaults to)."""

PROBE = "The quick brown fox, 4,9 and 49 (x=3.14); naïve café — 東京 😀\n\tdef f(a, b): return a+b  # done"
"""Text tokenised by both sides to compare tokenizers: digits, punctuation, accents, CJK, an emoji,
code and whitespace, where tokenizers that differ usually differ."""


def server_kind(card: dict[str, Any]) -> str:
    """``"vllm"``, ``"distill"`` or ``"openai"`` (hosted/unknown) from a ``/v1/models`` card."""
    owner = str(card.get("owned_by") or "").lower()
    return owner if owner in ("vllm", "distill") else "openai"


def probe_hash(ids: Sequence[int]) -> str:
    """sha256 (hex) of the token ids of `PROBE`: equal for tokenizers that tokenise the probe alike."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def local_probe_ids(tokenizer) -> list[int]:
    """A `transformers` tokenizer's ids for `PROBE` (no special tokens added)."""
    return list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])


def load_local_tokenizer(path: str) -> tuple[Any, dict[str, Any]]:
    """``(tokenizer, {"name", "vocab_hash", "probe_hash"})`` of a ``--teacher-tokenizer`` directory."""
    from pathlib import Path

    from distill.models.identity import vocab_hash
    from distill.models.loading import load_tokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--teacher-tokenizer: no such tokenizer directory: {path}")
    tok = load_tokenizer(path, "teacher tokenizer (--teacher-tokenizer)")
    info = {
        "name": Path(path).name,
        "vocab_hash": vocab_hash(tok),
        "probe_hash": probe_hash(local_probe_ids(tok)),
    }
    return tok, info


def _tokenize(teacher, text: str) -> tuple[list[int], list[str] | None]:
    """vLLM's ``/tokenize`` (served beside ``/v1``): the ids of ``text`` and their token strings."""
    root = teacher.urls[0].rsplit("/v1", 1)[0] if "/v1" in teacher.urls[0] else teacher.urls[0]
    body = {"model": teacher.model, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
    data = teacher._send("POST", root + "/tokenize", body, retries=1)
    return [int(t) for t in data["tokens"]], data.get("token_strs")


def server_tokenizer_info(teacher) -> dict[str, Any] | None:
    """What the server tells about its tokenizer: the card's ``tokenizer`` (`distill serve`), or for vLLM
    ``{"name": card root, "vocab_hash": None, "probe_hash"}`` from ``/tokenize``; None otherwise."""
    card = teacher._model_card() or {}
    tok = card.get("tokenizer")
    if isinstance(tok, dict):
        return tok
    if teacher._known_kind() == "vllm":
        ids, _ = _tokenize(teacher, PROBE)
        name = str(card.get("root") or teacher.model).rstrip("/").rsplit("/", 1)[-1]
        return {"name": name, "vocab_hash": None, "probe_hash": probe_hash(ids)}
    return None


def _limit_from(message: str) -> int | None:
    m = re.search(r"max allowed: (\d+)", message) or re.search(r"in \[0, (\d+)\]", message)
    return int(m.group(1)) if m else None


def check_top_k(teacher, k: int) -> None:
    """Refuse a ``k`` the server cannot return, before any prompt: 20 for hosted APIs; vLLM and
    `distill serve` are asked once with a one-token probe and their refusal is quoted."""
    url = teacher.urls[0]
    kind = teacher._known_kind()
    if k <= 0:
        return
    if kind == "openai":
        if k > HOSTED_MAX_TOP_LOGPROBS:
            raise ValueError(
                f"--top-k {k}: {url} is a hosted-style API (its /v1/models card is not vLLM's or distill's), "
                f"which returns at most {HOSTED_MAX_TOP_LOGPROBS} top log-probabilities per token; "
                "nothing was sent"
            )
        return
    if kind == "distill" and k <= HOSTED_MAX_TOP_LOGPROBS:
        return  # within `distill serve`'s default limit: no probe (its answers already carry ids)
    body = {"model": teacher.model, "prompt": "a", "max_tokens": 1, "temperature": 0.0, "logprobs": k}
    try:
        teacher._send("POST", "/completions", body, retries=1)
    except APIError as err:
        if err.status != 400:
            return  # not a refusal of k (a fault, a timeout): the requests' own retries deal with it
        limit = _limit_from(err.message)
        shown = f" (its limit: {limit})" if limit is not None else ""
        raise ValueError(
            f"--top-k {k} is above what {url} returns{shown}: the server answered a one-token probe "
            f"with {err.message}; nothing else was sent"
        ) from None


def check_tokenizer(teacher) -> None:
    """A ``--teacher-tokenizer`` copy tokenises `PROBE` as the server does (vLLM ``/tokenize``), or has
    the vocabulary hash the server's card reports (`distill serve`); else ``ValueError`` naming the first
    differing probe token. Hosted APIs tokenise nothing for clients: nothing to check there."""
    if teacher._tok is None:
        return
    card = teacher._model_card() or {}
    where = f"--teacher-tokenizer {teacher.tokenizer_dir}"
    theirs = card.get("tokenizer") if isinstance(card.get("tokenizer"), dict) else None
    if theirs and theirs.get("vocab_hash"):
        if theirs["vocab_hash"] != teacher._tok_info["vocab_hash"]:
            raise ValueError(
                f"{where} is not the tokenizer of {teacher.urls[0]} (vocabulary hash "
                f"{teacher._tok_info['vocab_hash'][:12]} vs the server's {theirs['vocab_hash'][:12]})"
            )
        return
    if teacher._known_kind() != "vllm":
        return
    server_ids, strs = _tokenize(teacher, PROBE)
    mine = local_probe_ids(teacher._tok)
    if server_ids == mine:
        return
    i = next((j for j, (a, b) in enumerate(zip(server_ids, mine)) if a != b), min(len(mine), len(server_ids)))
    ours = teacher._tok.convert_ids_to_tokens(mine[i]) if i < len(mine) else None
    srv = (strs[i] if strs and i < len(strs) else None) if i < len(server_ids) else None
    raise ValueError(
        f"{where} tokenises the probe text differently from {teacher.urls[0]}: first difference at probe "
        f"token {i}: server {server_ids[i] if i < len(server_ids) else None} ({srv!r}), local "
        f"{mine[i] if i < len(mine) else None} ({ours!r}) ({len(server_ids)} vs {len(mine)} tokens)"
    )


def _transient(err: APIError) -> bool:
    """A failure a retry may fix (no answer, 5xx, 429), not an answer saying what the server is."""
    return err.retryable and (err.status is None or err.status >= 500 or err.status == 429)


def prepare(teacher, settings: GenerationSettings, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """`APITeacher.prepare`: card, k limit, tokenizer check; the server's report for the manifest.

    ``known``: what the store recorded the last time (its ``server``): a k already checked against
    this store's server is not probed again (an identical re-run sends nothing but the card lookup).
    A card lookup that fails transiently (no answer, 5xx) is not an error here: the requests' own
    retries deal with a flaky server; a 404 or a 200 that is not a model list is."""
    known = known or {}
    k = int(settings.top_logprobs)
    try:
        try:
            card = teacher._model_card() or {}
        except APIError as err:
            if err.status in (401, 403):
                raise
            if not _transient(err):
                raise APIError(f"not an OpenAI-compatible endpoint: {err}", retryable=False) from None
            return {**known, "kind": known.get("kind")}
        kind = teacher._known_kind()
        check_tokenizer(teacher)
        if known.get("top_k_checked") != k:
            check_top_k(teacher, k)
        tok = teacher.tokenizer_info()
    except APIError as err:
        raise ValueError(f"--teacher {teacher.urls[0]}: {err}") from None
    return {
        "kind": kind,
        "fingerprint": card.get("weights_fingerprint"),
        "root": card.get("root"),
        "tokenizer": tok,
        "top_k_checked": k,
    }


def score(
    teacher, sequences: Sequence[Sequence[int]], k: int
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """`APITeacher.score`: one ``/v1/completions`` request per sequence with the ids as the prompt,
    ``max_tokens: 1`` and ``prompt_logprobs: k`` (vLLM); rows sorted and cut to k, row 0 zeros."""
    from distill.models.responses import parse_prompt_logprobs

    if teacher._known_kind() != "vllm":
        raise APIError(
            f"{teacher.urls[0]} cannot score given tokens (on-policy needs vLLM's prompt_logprobs; "
            f"its /v1/models card says {teacher.kind!r})",
            retryable=False,
        )
    out = []
    for seq in sequences:
        body = {"model": teacher.model, "prompt": [int(t) for t in seq], "max_tokens": 1, "temperature": 0.0}
        body.update(prompt_logprobs=int(k), return_token_ids=True)
        body.update(teacher.extra_body)
        ids, top_ids, top_lps = parse_prompt_logprobs(teacher._send("POST", "/completions", body), int(k))
        if ids != [int(t) for t in seq]:
            raise APIError(f"{teacher.urls[0]} scored other tokens than it was sent", retryable=False)
        out.append((top_ids, top_lps))
    return out
