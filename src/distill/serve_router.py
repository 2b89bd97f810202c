"""Routing for `distill serve --router FILE --fallback URL`: the student answers when it is confident,
the teacher endpoint otherwise, and ``/metrics`` counts both ways (see docs/serve.md, "Routing").

Flow per request: the student answers it (with at least `ROUTER_TOP_K` top log-probabilities per
token, whatever the client asked for, so the router's signal is at hand); every choice's
`confidence_signals` go through `Router.decide`; when all say "student" the student's answer is
returned, otherwise the client's original request body is forwarded to the fallback endpoint and
its response is returned unchanged. The whole request goes one way (several prompts or ``n > 1``
included), so a client never gets a response mixing two models.

The fallback's API key comes from an environment variable; it is held here only to build the
``Authorization`` header and never appears in logs, errors or responses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from distill.routing import Router, confidence_signals
from distill.serve_format import APIError
from distill.teachers.base import GenerationSettings
from distill.teachers.hf import Generation

log = logging.getLogger("distill.serve")

ROUTER_TOP_K = 5
"""Top log-probabilities per token the student computes for the router (what `distill route fit` uses)."""

ROUTE_HEADER = "x-distill-routed-to"
"""Response header naming who answered: ``student`` or ``teacher``."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the latency histogram buckets in ``/metrics``."""

ROUTES = ("student", "teacher")


def load_router(path: str | Path) -> Router:
    """`Router.load` with errors naming ``--router``; refuses routers serving cannot apply.

    A router fitted with an out-of-distribution cut-off (``distill route fit --train``) needs an OOD
    score per request, which the server does not compute: it is refused rather than sending every
    request to the teacher."""
    try:
        router = Router.load(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--router: {err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--router {path}: not a usable router file ({err})") from None
    if not hasattr(router, "threshold_"):
        raise ValueError(f"--router {path}: the file has no learned threshold_")
    if router.ood_signal and math.isfinite(getattr(router, "ood_threshold_", math.inf)):
        raise ValueError(
            f"--router {path}: this router also cuts on an out-of-distribution score "
            f"(ood_threshold_={router.ood_threshold_:.4g}), which distill serve does not compute; "
            "fit it without --train to serve it"
        )
    return router


def check_fallback_url(url: str) -> str:
    """The fallback base URL without a trailing slash; a clear ``--fallback`` error otherwise."""
    parsed = httpx.URL(url) if url.startswith(("http://", "https://")) else None
    if parsed is None or not parsed.host:
        raise ValueError(f"--fallback must be an http(s) base URL such as http://host:8000/v1, got {url!r}")
    if parsed.userinfo:
        raise ValueError(
            "--fallback must not carry credentials; name the key's variable with --fallback-api-key-env"
        )
    return url.rstrip("/")


@dataclasses.dataclass
class _Histogram:
    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += seconds
        self.n += 1


class RouteMetrics:
    """Counters behind ``/metrics`` (thread-safe; written in Prometheus text format by `render`).

    Estimated saving of one request, in the router's cost unit divided by 1e6 (dollars when the
    router's costs are $ per 1M requests, as `distill route fit --prices` writes them): the
    student pays ``student_cost`` on every request (it always answers first), and a request it
    keeps avoids ``teacher_cost``. So the saving against "teacher only" is
    ``(n_student * teacher_cost - n_all * student_cost) / 1e6``; it can be negative.
    """

    def __init__(self, teacher_cost: float, student_cost: float) -> None:
        self.teacher_cost, self.student_cost = float(teacher_cost), float(student_cost)
        self.requests = dict.fromkeys(ROUTES, 0)
        self.latency = {r: _Histogram() for r in ROUTES}
        self.fallback_errors = 0
        self._lock = threading.Lock()

    def record(self, route: str, seconds: float, *, failed: bool = False) -> None:
        with self._lock:
            self.requests[route] += 1
            self.latency[route].observe(seconds)
            self.fallback_errors += int(failed)

    def cost_saved(self) -> float:
        n_all = sum(self.requests.values())
        return (self.requests["student"] * self.teacher_cost - n_all * self.student_cost) / 1e6

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP distill_requests_total Requests answered, by who answered (failed fallbacks count as teacher).",
                "# TYPE distill_requests_total counter",
            ]
            lines += [f'distill_requests_total{{route="{r}"}} {self.requests[r]}' for r in ROUTES]
            lines += [
                "# HELP distill_fallback_errors_total Requests routed to the teacher whose fallback call failed (502).",
                "# TYPE distill_fallback_errors_total counter",
                f"distill_fallback_errors_total {self.fallback_errors}",
                "# HELP distill_request_latency_seconds Time from request to response, by route (the student's "
                "answer included for teacher-routed requests).",
                "# TYPE distill_request_latency_seconds histogram",
            ]
            for r in ROUTES:
                h = self.latency[r]
                lines += [
                    f'distill_request_latency_seconds_bucket{{route="{r}",le="{b}"}} {c}'
                    for b, c in zip(LATENCY_BUCKETS, h.counts, strict=True)
                ]
                lines += [
                    f'distill_request_latency_seconds_bucket{{route="{r}",le="+Inf"}} {h.n}',
                    f'distill_request_latency_seconds_sum{{route="{r}"}} {h.total:.6f}',
                    f'distill_request_latency_seconds_count{{route="{r}"}} {h.n}',
                ]
            lines += [
                "# HELP distill_estimated_cost_saved Estimated cost saved against sending every request to the "
                "teacher, in router cost units / 1e6 (dollars when the router's costs are $ per 1M requests).",
                "# TYPE distill_estimated_cost_saved gauge",
                f"distill_estimated_cost_saved {self.cost_saved():.9g}",
            ]
        return "\n".join(lines) + "\n"


class RoutingPolicy:
    """What `distill.serve.build_app` needs to route: settings for the student, the decision, the
    forwarding to the fallback, and the metrics.

    ``fallback_url``: OpenAI base URL of the teacher (``…/v1``); ``fallback_api_key``: sent as a
    Bearer token, never logged; ``fallback_model``: replaces the request's ``model`` field when
    forwarding (servers such as vLLM check it); ``timeout``: seconds per fallback call.
    """

    def __init__(
        self,
        router: Router,
        fallback_url: str,
        *,
        fallback_api_key: str | None = None,
        fallback_model: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.router = router
        self.fallback_url = check_fallback_url(fallback_url)
        self.fallback_model = fallback_model
        self._headers = {"authorization": f"Bearer {fallback_api_key}"} if fallback_api_key else {}
        self.timeout = timeout
        self.metrics = RouteMetrics(router.teacher_cost, router.student_cost)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"RoutingPolicy(signal={self.router.signal!r}, fallback_url={self.fallback_url!r})"

    def student_settings(self, settings: GenerationSettings) -> GenerationSettings:
        """The client's settings with enough top-k log-probabilities for the router's signal."""
        return dataclasses.replace(settings, top_logprobs=max(settings.top_logprobs, ROUTER_TOP_K))

    def decide(self, gens: Sequence[Generation]) -> str:
        """``"student"`` when every choice is confident, else ``"teacher"`` (an empty answer has no signal)."""
        for g in gens:
            tops = g.completion.top_logprobs
            if not tops or any(len(row) == 0 for row in tops):
                return "teacher"
            if self.router.decide(confidence_signals(tops)) != "student":
                return "teacher"
        return "student"

    def trim(self, gens: Sequence[Generation], k: int) -> list[Generation]:
        """``gens`` with the top-k lists cut back to the client's ``k`` (the router asked for more)."""
        out = []
        for g in gens:
            c = g.completion
            if c.top_ids is not None and c.top_logprobs is not None:
                c = dataclasses.replace(
                    c, top_ids=[r[:k] for r in c.top_ids], top_logprobs=[r[:k] for r in c.top_logprobs]
                )
            out.append(dataclasses.replace(g, completion=c))
        return out

    def student_reply(self, reply: Any, started: float) -> Response:
        """The student's answer (a dict or a streaming response) with the route header; counted."""
        response = reply if isinstance(reply, Response) else JSONResponse(reply)
        response.headers[ROUTE_HEADER] = "student"
        self.metrics.record("student", time.perf_counter() - started)
        return response

    async def forward(self, path: str, body: dict[str, Any], stream: bool, started: float) -> Response:
        """POST the client's body to the fallback's ``path``; its response as-is, or a 502."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        if self.fallback_model is not None:
            body = {**body, "model": self.fallback_model}
        request = self._client.build_request(
            "POST", self.fallback_url + path, json=body, headers=self._headers
        )
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as err:
            return self._failed(started, f"{type(err).__name__} reaching {self.fallback_url + path}")
        if upstream.status_code != 200:
            await upstream.aclose()
            return self._failed(started, f"HTTP {upstream.status_code} from {self.fallback_url + path}")
        headers = {ROUTE_HEADER: "teacher"}
        media_type = upstream.headers.get("content-type", "application/json")
        self.metrics.record("teacher", time.perf_counter() - started)
        # Bodies are passed on decoded (aiter_bytes/aread): the teacher's content-encoding is not forwarded.
        if stream:  # pass the teacher's server-sent events through as they come
            return StreamingResponse(
                upstream.aiter_bytes(),
                media_type=media_type,
                headers=headers,
                background=BackgroundTask(upstream.aclose),
            )
        try:
            content = await upstream.aread()
        except httpx.HTTPError as err:
            return self._failed(
                started,
                f"{type(err).__name__} reading the answer of {self.fallback_url + path}",
                counted=True,
            )
        finally:
            await upstream.aclose()
        return Response(content=content, media_type=media_type, headers=headers)

    def _failed(self, started: float, why: str, *, counted: bool = False) -> Response:
        # ``why`` names the URL and the error type only: never headers, so never the key.
        log.warning("fallback failed: %s", why)
        if counted:  # already counted as a teacher answer once the headers had arrived
            with self.metrics._lock:
                self.metrics.fallback_errors += 1
        else:
            self.metrics.record("teacher", time.perf_counter() - started, failed=True)
        msg = f"the router sent this request to the fallback teacher, which failed: {why}"
        response = APIError(502, msg, code="fallback_failed").response()
        response.headers[ROUTE_HEADER] = "teacher"
        return response

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
