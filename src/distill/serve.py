"""`distill serve`: an OpenAI-compatible HTTP server for a local causal LM (the student first of all).

Routes: ``GET /health`` (always open), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``. Responses follow OpenAI's formats, with
``logprobs``/``top_logprobs``; each choice also carries the token ids (``prompt_token_ids``,
``token_ids``, and ``top_token_ids`` when log-probabilities were asked for) so distill's own API
teacher can fill the store without retokenising. See docs/serve.md.

The generation backend is any object with the `Backend` methods (`HFTeacher` is one); `build_app`
serves a given backend, `create_app` builds an `HFTeacher` from a model directory first. One
worker task feeds the backend, so model access is serialised; queued requests with identical
settings are decoded together as one batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.serve_format import chat_choice, completion_choice
from distill.teachers.base import GenerationSettings
from distill.teachers.base import Request as TeacherRequest
from distill.teachers.hf import Generation

log = logging.getLogger("distill.serve")


class Backend(Protocol):
    """What the server needs from a model. `HFTeacher` implements it; a router can too."""

    batch_size: int

    def identity(self) -> dict[str, Any]: ...

    def generate(
        self, requests: Sequence[TeacherRequest], settings: GenerationSettings
    ) -> list[Generation]: ...

    def token_bytes(self, token_id: int) -> bytes: ...


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


class APIError(Exception):
    """An error answered as OpenAI-style JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Batcher:
    """A single worker that feeds the backend: serial model access, same-settings requests batched."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: list = []

    async def submit(self, requests: list[TeacherRequest], settings: GenerationSettings) -> list[Generation]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((requests, settings, fut))
        return await fut

    async def run(self) -> None:
        while True:
            first = self.pending.pop(0) if self.pending else await self.queue.get()
            batch, size = [first], len(first[0])
            while not self.queue.empty():
                self.pending.append(self.queue.get_nowait())
            for item in list(self.pending):  # take waiting requests with identical settings, in order
                if item[1] == first[1] and size + len(item[0]) <= max(self.backend.batch_size, len(first[0])):
                    self.pending.remove(item)
                    batch.append(item)
                    size += len(item[0])
            await self._answer(batch)

    async def _answer(self, batch: list) -> None:
        settings = batch[0][1]
        try:
            flat = [r for reqs, _, _ in batch for r in reqs]
            out = await asyncio.to_thread(self.backend.generate, flat, settings)
        except Exception as err:
            if len(batch) > 1:  # one bad request must not fail the others: answer each alone
                for item in batch:
                    await self._answer([item])
                return
            out, error = None, err
        else:
            error = None
        start = 0
        for reqs, _, fut in batch:
            if fut.done():  # the client went away
                start += len(reqs)
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(out[start : start + len(reqs)])
            start += len(reqs)


def create_app(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    limits: ServeLimits | None = None,
    device: str = "cpu",
    dtype: Any = None,
    batch_size: int = 8,
    trust_remote_code: bool = False,
) -> FastAPI:
    """Load the causal LM in ``model_dir`` as an `HFTeacher` and serve it (see `build_app`)."""
    from distill.teachers.hf import HFTeacher

    limits = limits or ServeLimits(max_body_bytes=max_body_bytes)
    backend = HFTeacher(
        model_dir, device=device, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code
    )
    return build_app(backend, api_key=api_key, limits=limits)


def build_app(backend: Backend, *, api_key: str | None = None, limits: ServeLimits | None = None) -> FastAPI:
    """An OpenAI-compatible FastAPI app answering from ``backend``.

    ``api_key``: when set, every route but /health needs ``Authorization: Bearer <api_key>``
    (401 otherwise). Only a sha256 digest of it is kept; it is never logged or echoed.
    """
    limits = limits or ServeLimits()
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
    ident = backend.identity()
    model_id = str(ident.get("name", "model"))
    batcher = _Batcher(backend)

    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="distill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.limits = limits

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and key_digest is not None:
            auth = request.headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            given_digest = hashlib.sha256(given.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_digest, key_digest):
                return APIError(401, "missing or invalid API key", code="invalid_api_key").response()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _too_large(limits)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail)).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id}

    def model_card() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "distill"}
        if "tokenizer" in ident:
            card["tokenizer"] = ident["tokenizer"]  # extension: lets clients check tokenizer identity
        if getattr(backend, "max_context", None):
            card["max_model_len"] = backend.max_context
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(
                404, f"model {name!r} not found; this server serves {model_id!r}", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, limits)
        prompts = _prompts(body, limits)
        settings, n = _settings(body, limits, chat=False)
        k = settings.top_logprobs if body.get("logprobs") is not None else None
        reqs = _fan_out(prompts, n, body, lambda rid, p: TeacherRequest(id=rid, prompt=p))
        gens = await _run(batcher, reqs, settings)
        choices = [completion_choice(i, g, backend.token_bytes, k) for i, g in enumerate(gens)]
        return _response("cmpl", "text_completion", model_id, choices, gens, n)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, limits)
        messages = _messages(body)
        settings, n = _settings(body, limits, chat=True)
        k = settings.top_logprobs if body.get("logprobs") else None
        reqs = _fan_out([messages], n, body, lambda rid, m: TeacherRequest(id=rid, messages=m))
        gens = await _run(batcher, reqs, settings)
        choices = [chat_choice(i, g, backend.token_bytes, k) for i, g in enumerate(gens)]
        out = _response("chatcmpl", "chat.completion", model_id, choices, gens, n)
        out["prompt_token_ids"] = gens[0].completion.prompt_token_ids  # as vLLM does for chat
        return out

    return app


# --- request parsing: every bad value is a 400 naming the parameter ------------------------------


def _too_large(limits: ServeLimits) -> JSONResponse:
    msg = f"request body exceeds the limit of {limits.max_body_bytes} bytes"
    return APIError(413, msg, code="request_too_large").response()


async def _read_json(request: Request, limits: ServeLimits) -> dict[str, Any]:
    import json

    chunks, size = [], 0
    async for chunk in request.stream():  # bodies without Content-Length are counted as they arrive
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise APIError(400, f"{name} must be an integer in [{lo}, {hi}], got {value!r}", param=name)
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
        raise APIError(400, f"{name} must be a number in {bracket}{lo}, {hi}], got {value!r}", param=name)
    return float(value)


_UNSUPPORTED = {
    "stream": False,
    "echo": False,
    "suffix": None,
    "logit_bias": None,
    "tools": None,
    "stop": None,
}


def _settings(body: dict, limits: ServeLimits, *, chat: bool) -> tuple[GenerationSettings, int]:
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (neutral, None, {}, []):
            raise APIError(400, f"{name} is not supported by distill serve", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by distill serve (only 0)", param=name)
    if chat:
        max_new = _int(body, "max_completion_tokens", None, 1, limits.max_tokens)
        max_new = max_new or _int(body, "max_tokens", 256, 1, limits.max_tokens)
        if not isinstance(body.get("logprobs", False), bool | None):
            raise APIError(400, f"logprobs must be a boolean, got {body['logprobs']!r}", param="logprobs")
        k = _int(body, "top_logprobs", 0, 0, limits.max_top_logprobs)
        if k and not body.get("logprobs"):
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
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


def _prompts(body: dict, limits: ServeLimits) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(
            400,
            "prompt must be a string or a non-empty list of strings (token ids are not supported)",
            param="prompt",
        )
    if len(prompts) > limits.max_prompts:
        raise APIError(
            400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt"
        )
    return prompts


def _messages(body: dict) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must have a string role and content", param="messages")
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def _fan_out(items: list, n: int, body: dict, make) -> list[TeacherRequest]:
    # With a seed the per-request sampling seeds are reproducible; without one every call differs.
    tag = "s" if body.get("seed") is not None else uuid.uuid4().hex
    return [make(f"{tag}:{p}:{c}", item) for p, item in enumerate(items) for c in range(n)]


async def _run(
    batcher: _Batcher, reqs: list[TeacherRequest], settings: GenerationSettings
) -> list[Generation]:
    try:
        return await batcher.submit(reqs, settings)
    except ValueError as err:  # bad input found by the backend (prompt too long, no chat template)
        raise APIError(400, str(err)) from None
    except Exception:
        log.exception("generation failed")
        raise APIError(500, "generation failed; see the server log") from None


def _response(prefix: str, obj: str, model_id: str, choices: list, gens: list[Generation], n: int) -> dict:
    # Prompt tokens count once per prompt (not per choice), as OpenAI counts them.
    prompt_tokens = sum(g.completion.usage.get("prompt_tokens", 0) for g in gens[::n])
    completion_tokens = sum(g.completion.usage.get("completion_tokens", 0) for g in gens)
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
