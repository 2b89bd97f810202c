"""`distill serve URL --router R --fallback URL`: the routing decision as a thin, model-free layer
between an OpenAI-compatible student (vLLM replicas, `distill serve`, anything) and a teacher.

Per request (``POST /v1/completions``, ``POST /v1/chat/completions``): the body is validated as
the local server validates it (`distill.serve.format`); a router with an out-of-distribution
cut-off screens it first (`RoutingPolicy.screen`); then a student replica is asked, not
streamed and with at least `ROUTER_TOP_K` top log-probabilities, the router's signal is computed
from the log-probabilities it returned (`RoutingPolicy.decide_rows`, the code the local server
decides with), and either the student's answer goes back (as server-sent events when the client
asked ``stream: true``: the decision needs the whole answer first) or the client's original body
is forwarded to the fallback teacher, whose events stream through as they arrive.

Bounded: at most ``max_inflight`` requests per upstream (429 with ``Retry-After`` above it);
per-upstream timeouts; a circuit breaker per student replica (`distill.serve.students.Breaker`)
sends everything to the teacher while the student fails (reason ``circuit_open``; a single failed
student call goes to the teacher as ``student_error``). Stateless beyond counters: any number of
gateway processes behind any load balancer behave as one. See docs/serve.md, "Gateway".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from distill.models.http import APIError
from distill.serve.format import (
    ServeLimits,
    error_response,
    parse_messages,
    parse_prompts,
    parse_settings,
    parse_stop,
    parse_stream,
    read_json,
    stream_events,
)
from distill.serve.guard import Guard
from distill.serve.routing import ROUTE_HEADER, RoutingPolicy, busy
from distill.serve.students import (
    BUSY,
    StudentFailed,
    StudentPool,
    StudentRejected,
    choice_rows,
    student_body,
    trim_for_client,
)
from distill.serve.upstream import Upstream, UpstreamError

log = logging.getLogger("distill.serve")

UPSTREAM_HEADER = "x-distill-upstream"
"""On student-routed answers: which replica answered (``student-0``, ``student-1``, ...)."""

HEALTH_TIMEOUT = 2.0
"""Seconds `/health` waits for each upstream's ``/v1/models``."""


def validate(path: str, body: dict[str, Any], limits: ServeLimits) -> tuple[int | None, tuple[bool, bool]]:
    """The local server's checks on one body (400s naming the parameter); returns the client's
    top-k (None: no log-probabilities asked) and ``(stream, include_usage)``."""
    chat = path == "/chat/completions"
    if chat:
        parse_messages(body)
    else:
        parse_prompts(body, limits)
    settings, _ = parse_settings(body, limits, chat=chat)
    parse_stop(body)
    asked = body.get("logprobs") if chat else body.get("logprobs") is not None
    return (settings.top_logprobs if asked else None), parse_stream(body)


def build_gateway(
    students: StudentPool,
    policy: RoutingPolicy,
    *,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
) -> Starlette:
    """The gateway as an ASGI app: ``students`` answer first, ``policy`` decides and forwards.

    ``api_key``: when set, every route but /health needs ``Authorization: Bearer <api_key>``.
    ``policy`` must count the gateway's reasons (``RoutingPolicy(..., reasons=REASONS)``)."""
    limits = limits or ServeLimits()
    metrics = policy.metrics

    async def answer(request: Request, path: str) -> Response:
        started = time.perf_counter()
        body = await read_json(request, limits)
        k, (stream, include_usage) = validate(path, body, limits)
        if (teacher := await policy.screen(path, body, stream, started)) is not None:
            return teacher
        replica = students.acquire()
        if replica is BUSY:
            students.rejected += 1
            return busy(f"the student ({students.max_inflight} per replica)")
        if replica is None:
            return await policy.forward(path, body, stream, started, reason="circuit_open")
        chat = path == "/chat/completions"
        try:
            data = await students.ask(replica, path, student_body(body, chat))
        except StudentRejected as err:
            return Response(err.body, status_code=err.status, media_type="application/json")
        except StudentFailed:
            return await policy.forward(path, body, stream, started, reason="student_error")
        if policy.decide_rows([choice_rows(c, chat) for c in data["choices"]]) == "teacher":
            return await policy.forward(path, body, stream, started, reason="confidence")
        out = trim_for_client(data, chat, k)
        if stream:  # the fields an event needs, should the student have left one out
            out.setdefault("id", f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}")
            out.setdefault("object", "chat.completion" if chat else "text_completion")
            out.setdefault("created", int(time.time()))
            out.setdefault("model", replica.model)
            out.setdefault("usage", None)
            for i, c in enumerate(out["choices"]):
                c.setdefault("index", i)
                c.setdefault("finish_reason", None)
            events = stream_events(out, chat=chat, include_usage=include_usage)
            reply: Response = StreamingResponse(iter(events), media_type="text/event-stream")
        else:
            reply = JSONResponse(out)
        reply.headers[UPSTREAM_HEADER] = replica.name
        return policy.student_reply(reply, started, usage=out.get("usage"))

    async def completions(request: Request) -> Response:
        return await answer(request, "/completions")

    async def chat_completions(request: Request) -> Response:
        return await answer(request, "/chat/completions")

    async def models(_request: Request) -> Response:
        """The student's model list (what `APITeacher` and the openai client ask first)."""
        for r in students.replicas:
            if not r.breaker.available():
                continue
            try:
                reply = await r.upstream.request("GET", "/models")
            except UpstreamError:
                continue
            if reply.status == 200:
                return Response(reply.body, media_type="application/json")
        raise APIError("no student endpoint answered /v1/models", status=502, code="upstream_failed")

    async def health(_request: Request) -> Response:
        ups = [r.upstream for r in students.replicas] + [policy.fallback]
        ok = await asyncio.gather(*(_answers(u) for u in ups))
        report = [{"name": u.name, "ok": a} for u, a in zip(ups, ok)]
        for entry, r in zip(report, students.replicas):
            entry["breaker"] = r.breaker.state
        status = "ok" if all(ok) else "degraded" if any(ok) else "down"
        return JSONResponse(
            {"status": status, "upstreams": report}, status_code=503 if status == "down" else 200
        )

    async def metrics_route(_request: Request) -> Response:
        text = metrics.render(_upstream_lines(students, policy.fallback))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def api_error(_request: Request, err: APIError) -> Response:
        return error_response(err)

    async def http_error(_request: Request, err: HTTPException) -> Response:
        return error_response(APIError(str(err.detail), status=err.status_code))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await students.aclose()
        await policy.aclose()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.add_middleware(Guard, api_key=api_key, limits=limits)
    app.state.students, app.state.policy = students, policy
    return app


async def _answers(up: Upstream) -> bool:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT):
            return (await up.request("GET", "/models")).status == 200
    except (UpstreamError, TimeoutError):
        return False


def _upstream_lines(students: StudentPool, teacher: Upstream) -> list[str]:
    ups = [(r.upstream, r) for r in students.replicas] + [(teacher, None)]
    lines = [
        "# HELP distill_upstream_inflight Requests in flight to each upstream now.",
        "# TYPE distill_upstream_inflight gauge",
    ]
    lines += [f'distill_upstream_inflight{{upstream="{u.name}"}} {u.inflight}' for u, _ in ups]
    lines += [
        "# HELP distill_rejected_total Requests answered 429: every student replica, or the teacher, had "
        "--max-inflight requests out.",
        "# TYPE distill_rejected_total counter",
        f'distill_rejected_total{{side="student"}} {students.rejected}',
        f'distill_rejected_total{{side="teacher"}} {teacher.rejected}',
    ]
    lines += [
        "# HELP distill_student_errors_total Failed student calls (transport, timeout, non-200, malformed).",
        "# TYPE distill_student_errors_total counter",
    ]
    lines += [f'distill_student_errors_total{{upstream="{r.name}"}} {r.errors}' for _, r in ups if r]
    lines += [
        "# HELP distill_circuit_open 1 while the replica's circuit breaker is open (half-open counts as open).",
        "# TYPE distill_circuit_open gauge",
    ]
    lines += [
        f'distill_circuit_open{{upstream="{r.name}"}} {int(r.breaker.state != "closed")}' for _, r in ups if r
    ]
    lines += [
        "# HELP distill_circuit_trips_total Times the replica's circuit breaker opened.",
        "# TYPE distill_circuit_trips_total counter",
    ]
    lines += [f'distill_circuit_trips_total{{upstream="{r.name}"}} {r.breaker.trips}' for _, r in ups if r]
    return lines


__all__ = ["ROUTE_HEADER", "UPSTREAM_HEADER", "build_gateway", "validate"]
