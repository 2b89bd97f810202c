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
import dataclasses
import inspect
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.models.base import GenerationSettings
from distill.models.base import Request as TeacherRequest
from distill.models.hf import Generation
from distill.models.http import APIError
from distill.serve.format import (
    ServeLimits,
    apply_stop,
    chat_choice,
    completion_choice,
    error_response,
    fan_out,
    parse_messages,
    parse_prompts,
    parse_settings,
    parse_stop,
    parse_stream,
    read_json,
    stream_events,
    usage_of,
)
from distill.serve.guard import Guard
from distill.serve.routing import RoutingPolicy
from distill.serve.stream import TokenSink, stream_answer

log = logging.getLogger("distill.serve")


class Backend(Protocol):
    """What the server needs from a model. `HFTeacher` implements it; a router can too.

    Optional: ``max_context`` (int, tokens) and ``encode(request) -> list[int]``; with both, a chat
    request without ``max_tokens`` is answered up to the default but within the context.
    """

    batch_size: int

    def identity(self) -> dict[str, Any]: ...

    def generate(
        self, requests: Sequence[TeacherRequest], settings: GenerationSettings
    ) -> list[Generation]: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class _Batcher:
    """A single worker that feeds the backend: serial model access, same-settings requests batched."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending: list = []
        # A backend that reports tokens as they are decoded (HFTeacher) can stream them.
        self.streams = "on_token" in inspect.signature(backend.generate).parameters

    async def submit(
        self, requests: list[TeacherRequest], settings: GenerationSettings, sink: TokenSink | None = None
    ) -> list[Generation]:
        """The generations of ``requests``; with ``sink``, each decoded token is also reported to it."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((requests, settings, fut, sink))
        return await fut

    async def run(self) -> None:
        while True:
            first = self.pending.pop(0) if self.pending else await self.queue.get()
            batch, size = [first], len(first[0])
            while not self.queue.empty():
                self.pending.append(self.queue.get_nowait())
            rest = []
            for item in self.pending:  # take waiting requests with identical settings, in order
                if item[1] == first[1] and size + len(item[0]) <= max(self.backend.batch_size, len(first[0])):
                    batch.append(item)
                    size += len(item[0])
                else:
                    rest.append(item)
            self.pending = rest
            try:
                await self._answer(batch)
            except Exception as err:  # never let the worker die: fail this batch, keep serving
                log.exception("batch failed")
                for _, _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(err)

    async def _answer(self, batch: list) -> None:
        settings = batch[0][1]
        try:
            flat = [r for reqs, *_ in batch for r in reqs]
            kw = {}
            if self.streams and any(item[3] is not None for item in batch):
                owners = [(item[3], j) for item in batch for j in range(len(item[0]))]

                def on_token(tok):  # decoding thread: hand the token to its request's sink
                    sink, j = owners[tok.index]
                    if sink is not None:
                        sink(dataclasses.replace(tok, index=j))

                kw["on_token"] = on_token
            out = await asyncio.to_thread(self.backend.generate, flat, settings, **kw)
        except Exception as err:
            if len(batch) > 1:  # one bad request must not fail the others: answer each alone
                for item in batch:
                    if item[3] is not None and item[3].started and not item[2].done():
                        item[2].set_exception(err)  # its tokens went out already: no second answer
                    else:
                        await self._answer([item])
                return
            out, error = None, err
        else:
            error = None
        start = 0
        for reqs, _, fut, _ in batch:
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
    routing: RoutingPolicy | None = None,
) -> FastAPI:
    """Load the causal LM in ``model_dir`` as an `HFTeacher` and serve it (see `build_app`).

    ``max_body_bytes`` sets the 413 limit when ``limits`` is not given (``limits`` wins otherwise);
    ``device``/``dtype``/``batch_size``/``trust_remote_code`` go to `HFTeacher`; ``routing``
    to `build_app`.
    """
    from distill.models.hf import HFTeacher

    limits = limits or ServeLimits(max_body_bytes=max_body_bytes)
    backend = HFTeacher(
        model_dir, device=device, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code
    )
    return build_app(backend, api_key=api_key, limits=limits, routing=routing)


def build_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    routing: RoutingPolicy | None = None,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app answering from ``backend``.

    ``api_key``: when set, every route but /health needs ``Authorization: Bearer <api_key>``
    (401 otherwise). Only a sha256 digest of it is kept; it is never logged or echoed.
    ``routing``: when given, each answer goes through it (student or fallback teacher, see
    `distill.serve.routing`) and ``GET /metrics`` reports the counts in Prometheus text format.
    """
    limits = limits or ServeLimits()
    ident = backend.identity()
    model_id = str(ident.get("name", "model"))
    batcher = _Batcher(backend)

    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        if routing is not None:
            await routing.aclose()

    app = FastAPI(title="distill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.limits = limits

    app.add_middleware(Guard, api_key=api_key, limits=limits)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        return error_response(APIError(str(err.detail), status=err.status_code))

    @app.get("/health")
    async def health():
        return {"status": "ok"}  # open to anyone: says nothing about the model

    def model_card() -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": 0, "owned_by": "distill"}
        for key in ("tokenizer", "weights_fingerprint"):  # extension: lets clients check what answers
            if key in ident:
                card[key] = ident[key]
        if getattr(backend, "max_context", None):
            card["max_model_len"] = backend.max_context
        return card

    if routing is not None:

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(routing.metrics.render(), media_type="text/plain; version=0.0.4")

    async def routed(gens: list[Generation], k: int, path: str, body: dict, stream: bool, started: float):
        """With routing: the fallback teacher's response, or None when the student keeps the request
        (``gens`` then trimmed in place to the client's top-k)."""
        if routing is None:
            return None
        if routing.decide(gens) == "teacher":
            return await routing.forward(path, body, stream, started)
        gens[:] = routing.trim(gens, k)
        return None

    async def screened(path: str, body: dict, stream: bool, started: float):
        """With routing: the teacher's response when the request is out of the router's training
        distribution (decided before the student runs), else None."""
        return None if routing is None else await routing.screen(path, body, stream, started)

    def reply_as_student(reply, started: float):
        return reply if routing is None else routing.student_reply(reply, started)

    def run_settings(settings: GenerationSettings) -> GenerationSettings:
        return settings if routing is None else routing.student_settings(settings)

    async def streamed(reqs, settings, n, k, stops, include_usage, *, chat: bool):
        """Tokens as they are decoded (no router: its decision needs the whole answer)."""
        return await stream_answer(
            lambda sink: _run(batcher, reqs, settings, sink),
            n_choices=len(reqs),
            n=n,
            chat=chat,
            model_id=model_id,
            k=k,
            stops=stops,
            include_usage=include_usage,
            token_bytes=backend.token_bytes,
        )

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(
                f"model {name!r} not found; this server serves {model_id!r}",
                status=404,
                code="model_not_found",
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        body = await read_json(request, limits)
        prompts = parse_prompts(body, limits)
        settings, n = parse_settings(body, limits, chat=False)
        k = settings.top_logprobs if body.get("logprobs") is not None else None
        reqs = fan_out(prompts, n, body, lambda rid, p: TeacherRequest(id=rid, prompt=p))
        stops, stream = parse_stop(body), parse_stream(body)
        if (teacher := await screened("/completions", body, stream[0], started)) is not None:
            return teacher
        if stream[0] and routing is None and batcher.streams:
            return await streamed(reqs, settings, n, k, stops, stream[1], chat=False)
        gens = [
            apply_stop(g, stops, backend.token_bytes)
            for g in await _run(batcher, reqs, run_settings(settings))
        ]
        if (
            teacher := await routed(gens, settings.top_logprobs, "/completions", body, stream[0], started)
        ) is not None:
            return teacher
        choices = [completion_choice(i, g, backend.token_bytes, k) for i, g in enumerate(gens)]
        reply = _reply(_response("cmpl", "text_completion", model_id, choices, gens, n), stream, chat=False)
        return reply_as_student(reply, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await read_json(request, limits)
        messages = parse_messages(body)
        settings, n = parse_settings(body, limits, chat=True)
        k = settings.top_logprobs if body.get("logprobs") else None
        reqs = fan_out([messages], n, body, lambda rid, m: TeacherRequest(id=rid, messages=m))
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            settings = await _fit_context(backend, reqs[0], settings)
        stops, stream = parse_stop(body), parse_stream(body)
        path = "/chat/completions"
        if (teacher := await screened(path, body, stream[0], started)) is not None:
            return teacher
        if stream[0] and routing is None and batcher.streams:
            return await streamed(reqs, settings, n, k, stops, stream[1], chat=True)
        gens = [
            apply_stop(g, stops, backend.token_bytes)
            for g in await _run(batcher, reqs, run_settings(settings))
        ]
        if (teacher := await routed(gens, settings.top_logprobs, path, body, stream[0], started)) is not None:
            return teacher
        choices = [chat_choice(i, g, backend.token_bytes, k) for i, g in enumerate(gens)]
        out = _response("chatcmpl", "chat.completion", model_id, choices, gens, n)
        out["prompt_token_ids"] = gens[0].completion.prompt_token_ids  # as vLLM does for chat
        return reply_as_student(_reply(out, stream, chat=True), started)

    return app


async def _fit_context(
    backend: Backend, req: TeacherRequest, settings: GenerationSettings
) -> GenerationSettings:
    """Chat without max_tokens: answer up to the default, but no further than the context allows."""
    encode, context = getattr(backend, "encode", None), getattr(backend, "max_context", None)
    if encode is None or not context:
        return settings
    try:
        room = context - len(await asyncio.to_thread(encode, req))
    except ValueError as err:
        raise APIError(str(err), status=400) from None
    if 1 <= room < settings.max_new_tokens:
        return dataclasses.replace(settings, max_new_tokens=room)
    return settings


async def _run(
    batcher: _Batcher, reqs: list[TeacherRequest], settings: GenerationSettings, sink: TokenSink | None = None
) -> list[Generation]:
    try:
        return await batcher.submit(reqs, settings, sink)
    except ValueError as err:  # bad input found by the backend (prompt too long, no chat template)
        raise APIError(str(err), status=400) from None
    except Exception:
        log.exception("generation failed")
        raise APIError("generation failed; see the server log", status=500) from None


def _reply(out: dict, stream: tuple[bool, bool], *, chat: bool):
    if not stream[0]:
        return out
    events = stream_events(out, chat=chat, include_usage=stream[1])
    return StreamingResponse(iter(events), media_type="text/event-stream")


def _response(prefix: str, obj: str, model_id: str, choices: list, gens: list[Generation], n: int) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": usage_of(gens, n),
    }
