"""The OpenAI wire format of `distill serve`: request parsing (every bad value is a 400 naming the
parameter), the shape of one choice of /v1/completions or /v1/chat/completions, and the
server-sent events that carry a finished response when `stream` is true.

Besides OpenAI's fields every choice carries distill's token-id extension (the first two as vLLM
names them): ``prompt_token_ids``, ``token_ids`` (the completion, including a final
end-of-sequence token when ``finish_reason`` is "stop"), and, when log-probabilities were asked
for, ``top_token_ids`` ((n_tokens, k) ids aligned with the ``top_logprobs`` entries) and, in
/v1/completions choices, ``top_token_logprobs`` ((n_tokens, k) values aligned with ``top_token_ids``).
Log-probability entries are one per completion token id, so the end-of-sequence token has one
too (its text is not part of ``text``/``content``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from distill.models.base import GenerationSettings
from distill.models.base import Request as TeacherRequest
from distill.models.hf import Generation
from distill.models.http import APIError


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for; beyond them the server answers 400 (413 for the body)."""

    max_body_bytes: int = 1 << 20
    """Largest accepted request body in bytes (413 above)."""
    max_tokens: int = 2048
    """Largest ``max_tokens`` / ``max_completion_tokens``; also bounded by the model's context."""
    max_n: int = 8
    """Largest ``n`` (choices per prompt)."""
    max_top_logprobs: int = 20
    """Largest ``top_logprobs`` (chat) / ``logprobs`` (completions); OpenAI's own limit is 20."""
    max_prompts: int = 64
    """Largest number of prompts in one /v1/completions call."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens", "max_n", "max_prompts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.max_top_logprobs) < 0:
            raise ValueError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs!r}")


def error_response(err: APIError) -> JSONResponse:
    """``err`` as the JSON response an OpenAI client expects (`APIError.body`, its HTTP status)."""
    return JSONResponse(err.body(), status_code=err.status or 500)


# --- requests ---------------------------------------------------------------------------------


def too_large(limits: ServeLimits) -> JSONResponse:
    msg = f"request body exceeds the limit of {limits.max_body_bytes} bytes"
    return error_response(APIError(msg, status=413, code="request_too_large"))


async def read_json(request: Request, limits: ServeLimits) -> dict[str, Any]:
    chunks, size = [], 0
    async for chunk in request.stream():  # bodies without Content-Length are counted as they arrive
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise APIError(f"request body exceeds the limit of {limits.max_body_bytes} bytes", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(f"request body is not valid JSON: {err}", status=400) from None
    except RecursionError:  # e.g. {"messages": [[[[...]]]]}: Python's parser gives up; the client erred
        raise APIError("request body is nested too deeply", status=400) from None
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object", status=400)
    return body


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise APIError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", status=400, param=name)
    return value


def _float(body: dict, name: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (lo < value if open_lo else lo <= value)
    )
    if not ok or not value <= hi:
        bracket = "(" if open_lo else "["
        raise APIError(
            f"{name} must be a number in {bracket}{lo}, {hi}], got {value!r}", status=400, param=name
        )
    return float(value)


_UNSUPPORTED = {
    "echo": False,
    "suffix": None,
    "logit_bias": None,
    "tools": None,
}


def parse_settings(body: dict, limits: ServeLimits, *, chat: bool) -> tuple[GenerationSettings, int]:
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (neutral, None, {}, []):
            raise APIError(f"{name} is not supported by distill serve", status=400, param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(f"{name} is not supported by distill serve (only 0)", status=400, param=name)
    if chat:
        max_new = _int(body, "max_completion_tokens", None, 1, limits.max_tokens)
        max_new = max_new or _int(body, "max_tokens", 256, 1, limits.max_tokens)
        if not isinstance(body.get("logprobs", False), bool | None):
            raise APIError(
                f"logprobs must be a boolean, got {body['logprobs']!r}", status=400, param="logprobs"
            )
        k = _int(body, "top_logprobs", 0, 0, limits.max_top_logprobs)
        if k and not body.get("logprobs"):
            raise APIError("top_logprobs needs logprobs to be true", status=400, param="top_logprobs")
    else:
        max_new = _int(body, "max_tokens", 16, 1, limits.max_tokens)
        k = _int(body, "logprobs", 0, 0, limits.max_top_logprobs)
    n = _int(body, "n", 1, 1, limits.max_n)
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    settings = GenerationSettings(
        max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_logprobs=k, seed=seed or 0
    )
    return settings, n


def parse_stream(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)`` from ``stream`` and ``stream_options.include_usage``."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise APIError(f"stream must be a boolean, got {stream!r:.40}", status=400, param="stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise APIError(
            "stream_options needs stream: true and must be an object", status=400, param="stream_options"
        )
    return bool(stream), bool((options or {}).get("include_usage", False))


def stream_events(out: dict, *, chat: bool, include_usage: bool) -> list[str]:
    """A finished response as server-sent events in OpenAI's chunk format, ending with ``[DONE]``.

    Generation is complete before the first event: each choice comes as one chunk with its whole
    text (and log-probabilities, token ids), then one with its ``finish_reason``.
    """
    head = {"id": out["id"], "object": out["object"] + ".chunk" if chat else out["object"]}
    head |= {"created": out["created"], "model": out["model"]}
    if include_usage:
        head["usage"] = None
    events = []
    for c in out["choices"]:
        first = {k: v for k, v in c.items() if k not in ("message", "finish_reason")}
        if chat:
            first["delta"] = {"role": "assistant", "content": c["message"]["content"]}
            last = {"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
        else:
            last = {"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}
        first["finish_reason"] = None
        events += [{**head, "choices": [first]}, {**head, "choices": [last]}]
    if include_usage:
        events.append({**head, "choices": [], "usage": out["usage"]})
    return [f"data: {json.dumps(e, allow_nan=False)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def parse_stop(body: dict) -> list[str]:
    """OpenAI's ``stop``: a string or up to 4 non-empty strings; [] when absent."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and x for x in stops):
        raise APIError(
            f"stop must be a non-empty string or a list of up to 4, got {stop!r:.80}",
            status=400,
            param="stop",
        )
    return stops


def apply_stop(g: Generation, stops: list[str], token_bytes: Callable[[int], bytes]) -> Generation:
    """Cut ``g`` at the first stop string: the text ends before it, token ids and log-probabilities
    end with the token that completed it, ``finish_reason`` becomes "stop" (as OpenAI does)."""
    c = g.completion
    hits = [(c.text.find(x), x) for x in stops if x in c.text]
    if not hits:
        return g
    cut, _ = min(hits)
    ids = c.completion_token_ids or []
    raw, n = b"", len(ids)
    for j, t in enumerate(ids):
        raw += token_bytes(t)
        if any(x in raw.decode("utf-8", errors="replace") for x in stops):
            n = j + 1
            break
    cut_c = dataclasses.replace(
        c,
        text=c.text[:cut],
        finish_reason="stop",
        completion_token_ids=ids[:n],
        top_ids=None if c.top_ids is None else c.top_ids[:n],
        top_logprobs=None if c.top_logprobs is None else c.top_logprobs[:n],
        usage={**c.usage, "completion_tokens": n},
    )
    return Generation(cut_c, g.token_logprobs[:n])


def parse_prompts(body: dict, limits: ServeLimits) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(
            "prompt must be a string or a non-empty list of strings (token ids are not supported)",
            status=400,
            param="prompt",
        )
    if len(prompts) > limits.max_prompts:
        raise APIError(
            f"at most {limits.max_prompts} prompts per request, got {len(prompts)}",
            status=400,
            param="prompt",
        )
    return prompts


def parse_messages(body: dict) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", status=400, param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(
                    f"messages[{i}].content: only text parts are supported", status=400, param="messages"
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(f"messages[{i}] must have a string role and content", status=400, param="messages")
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def fan_out(items: list, n: int, body: dict, make) -> list[TeacherRequest]:
    # With a seed the per-request sampling seeds are reproducible; without one every call differs.
    tag = "s" if body.get("seed") is not None else uuid.uuid4().hex
    return [make(f"{tag}:{p}:{c}", item) for p, item in enumerate(items) for c in range(n)]


# --- responses --------------------------------------------------------------------------------

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
        # The legacy {text: logprob} dicts merge ids that decode to the same text; these values stay
        # aligned with top_token_ids so a client can rebuild the exact top-k (APITeacher reads them).
        choice["top_token_logprobs"] = top_lps
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


def usage_of(gens: list[Generation], n: int) -> dict[str, int]:
    """OpenAI's ``usage`` of a response: prompt tokens once per prompt (not per choice, as OpenAI
    counts them; ``n`` choices per prompt), completion tokens of every choice."""
    prompt_tokens = sum(g.completion.usage.get("prompt_tokens", 0) for g in gens[::n])
    completion_tokens = sum(g.completion.usage.get("completion_tokens", 0) for g in gens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
