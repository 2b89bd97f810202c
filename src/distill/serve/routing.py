"""Routing for `distill serve --router FILE --fallback URL`: the student answers when it is confident,
the teacher endpoint otherwise, and ``/metrics`` counts both ways (see docs/serve.md, "Routing").

Flow per request: when the router has an out-of-distribution cut-off (``distill route fit
--train``), the request's text is scored first with the router's saved `OODScorer` and a request
above the cut-off goes straight to the teacher (reason ``ood``; the student does not run). Otherwise
the student answers it (with at least `ROUTER_TOP_K` top log-probabilities per token, whatever the
client asked for, so the router's signal is at hand); every choice's `confidence_signals` go
through `Router.confident`; when all are confident the student's answer is returned, otherwise
(reason ``confidence``) the client's original request body is forwarded to the fallback endpoint
and its response is returned unchanged. The whole request goes one way (several prompts or
``n > 1`` included), so a client never gets a response mixing two models.

The fallback's API key comes from an environment variable; it is held here only to build the
``Authorization`` header and never appears in logs, errors or responses.
"""

from __future__ import annotations

import asyncio
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

from distill.evaluate.signals import confidence_signals
from distill.models.base import GenerationSettings
from distill.models.hf import Generation
from distill.models.http import APIError, check_base_url
from distill.route.router import Router
from distill.serve.format import error_response

log = logging.getLogger("distill.serve")

ROUTER_TOP_K = 5
"""Top log-probabilities per token the student computes for the router (what `distill route fit` uses)."""

ROUTE_HEADER = "x-distill-routed-to"
"""Response header naming who answered: ``student`` or ``teacher``."""

REASON_HEADER = "x-distill-route-reason"
"""On teacher-routed responses: why (one of `REASONS`)."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the latency histogram buckets in ``/metrics``."""

ROUTES = ("student", "teacher")

REASONS = ("confidence", "ood")
"""Why a request went to the teacher: the student's signal was below the threshold, or the request
scored above the router's out-of-distribution cut-off."""


def load_router(path: str | Path) -> Router:
    """`Router.load` with errors naming ``--router``.

    A router with an out-of-distribution cut-off must come with its OOD scorer (``route fit
    --train`` saves it beside the router as ``<name>.ood/``): a router that records none, or whose
    scorer directory is missing, is refused here, before any model loads."""
    try:
        router = Router.load(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--router: {err}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--router {path}: not a usable router file ({err})") from None
    if not hasattr(router, "threshold_"):
        raise ValueError(f"--router {path}: the file has no learned threshold_")
    if router.cuts_on_ood:
        scorer = router.ood_scorer_path_
        if scorer is None:
            raise ValueError(
                f"--router {path}: this router also cuts on an out-of-distribution score "
                f"(ood_threshold_={router.ood_threshold_:.4g}) but records no OOD scorer to compute it; "
                "refit it with `distill route fit --train ...`, which saves the scorer beside the router"
            )
        if not scorer.is_dir():
            raise FileNotFoundError(
                f"--router {path}: its OOD scorer {scorer} is missing (`route fit --train` writes it "
                "beside the router file; copy it along with the router)"
            )
    return router


def check_fallback_url(url: str) -> str:
    """The fallback base URL without a trailing slash; a clear ``--fallback`` error otherwise."""
    return check_base_url(url, "--fallback", "--fallback-api-key-env")


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
    ``(n_student * teacher_cost - n_ran * student_cost) / 1e6`` where ``n_ran`` is every request but
    those sent to the teacher as out of distribution (the student never ran on them); it can be negative.
    """

    def __init__(self, teacher_cost: float, student_cost: float) -> None:
        self.teacher_cost, self.student_cost = float(teacher_cost), float(student_cost)
        self.requests = dict.fromkeys(ROUTES, 0)
        self.teacher_reasons = dict.fromkeys(REASONS, 0)
        self.latency = {r: _Histogram() for r in ROUTES}
        self.fallback_errors = 0
        self.ood_seconds, self.ood_scored = 0.0, 0
        self._lock = threading.Lock()

    def record(self, route: str, seconds: float, *, failed: bool = False, reason: str | None = None) -> None:
        """One answered request; ``reason`` (one of `REASONS`) for teacher-routed ones."""
        with self._lock:
            self.requests[route] += 1
            self.latency[route].observe(seconds)
            self.fallback_errors += int(failed)
            if route == "teacher":
                self.teacher_reasons[reason or "confidence"] += 1

    def record_ood_scoring(self, seconds: float) -> None:
        with self._lock:
            self.ood_seconds += seconds
            self.ood_scored += 1

    def cost_saved(self) -> float:
        # Requests sent away as out of distribution never ran the student: no student cost for them.
        n_student_ran = sum(self.requests.values()) - self.teacher_reasons["ood"]
        return (self.requests["student"] * self.teacher_cost - n_student_ran * self.student_cost) / 1e6

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP distill_requests_total Requests answered, by who answered (failed fallbacks count as teacher).",
                "# TYPE distill_requests_total counter",
            ]
            lines += [f'distill_requests_total{{route="{r}"}} {self.requests[r]}' for r in ROUTES]
            lines += [
                "# HELP distill_teacher_requests_total Requests routed to the teacher, by reason: the student "
                "was not confident, or the input scored out of distribution (the student did not run).",
                "# TYPE distill_teacher_requests_total counter",
            ]
            lines += [
                f'distill_teacher_requests_total{{reason="{r}"}} {self.teacher_reasons[r]}' for r in REASONS
            ]
            lines += [
                "# HELP distill_ood_score_seconds Time spent scoring requests' out-of-distribution score "
                "(embedding + nearest neighbours), per request scored.",
                "# TYPE distill_ood_score_seconds summary",
                f"distill_ood_score_seconds_sum {self.ood_seconds:.6f}",
                f"distill_ood_score_seconds_count {self.ood_scored}",
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
                "teacher, in router cost units / 1e6 (dollars when the router's costs are $ per 1M requests); "
                "requests sent away as out of distribution pay no student cost.",
                "# TYPE distill_estimated_cost_saved gauge",
                f"distill_estimated_cost_saved {self.cost_saved():.9g}",
            ]
        return "\n".join(lines) + "\n"


class RoutingPolicy:
    """What `distill.serve.build_app` needs to route: settings for the student, the decision, the
    forwarding to the fallback, and the metrics.

    ``fallback_url``: OpenAI base URL of the teacher (``…/v1``); ``fallback_api_key``: sent as a
    Bearer token, never logged; ``fallback_model``: replaces the request's ``model`` field when
    forwarding (servers such as vLLM check it); ``timeout``: seconds per fallback call;
    ``fallback_ca_bundle``: a PEM file of CA certificates trusted (instead of the system store) for an
    https fallback behind a private CA; without it the system store, which honours ``SSL_CERT_FILE``.
    Verification is never turned off.
    ``ood_scorer``: a fitted `distill.workload.coverage.OODScorer` for a router with an OOD cut-off; by
    default the one the router file records (``router.ood_scorer_path_``) is loaded here and
    warmed up once, so a missing or broken scorer fails at start, not on the first request.
    """

    def __init__(
        self,
        router: Router,
        fallback_url: str,
        *,
        fallback_api_key: str | None = None,
        fallback_model: str | None = None,
        timeout: float = 120.0,
        ood_scorer: Any = None,
        fallback_ca_bundle: str | None = None,
    ) -> None:
        from distill.models.http import tls_context

        self.router = router
        self.fallback_url = check_fallback_url(fallback_url)
        # Built (and the file checked) now: a bad bundle fails at start, not on the first fallback.
        self._verify: Any = (
            tls_context(fallback_ca_bundle, where="--fallback-ca-bundle") if fallback_ca_bundle else True
        )
        self.fallback_model = fallback_model
        self._headers = {"authorization": f"Bearer {fallback_api_key}"} if fallback_api_key else {}
        self.timeout = timeout
        self.metrics = RouteMetrics(router.teacher_cost, router.student_cost)
        self._client: httpx.AsyncClient | None = None
        self.ood_scorer = None
        if router.cuts_on_ood:
            self.ood_scorer = ood_scorer if ood_scorer is not None else _load_scorer(router)
            self.ood_scorer.score(["warm-up"])  # loads the embedding model now, not on a request
        # Scoring runs in worker threads; one at a time, because a tokenizer is not safe to share.
        self._ood_lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"RoutingPolicy(signal={self.router.signal!r}, fallback_url={self.fallback_url!r})"

    def student_settings(self, settings: GenerationSettings) -> GenerationSettings:
        """The client's settings with enough top-k log-probabilities for the router's signal."""
        return dataclasses.replace(settings, top_logprobs=max(settings.top_logprobs, ROUTER_TOP_K))

    async def screen(self, path: str, body: dict[str, Any], stream: bool, started: float) -> Response | None:
        """Before the student runs: the teacher's response when any of the request's texts scores
        above the router's OOD cut-off, else None (also None for a router without one)."""
        if self.ood_scorer is None:
            return None
        texts = request_texts(path, body)
        try:
            scores = await asyncio.to_thread(self._score, texts)
        except Exception:  # no score is an unknown score: the safe side is the teacher
            log.exception("OOD scoring failed; sending the request to the teacher")
            scores = [math.nan]
        if any(self.router.out_of_distribution(float(s)) for s in scores):
            return await self.forward(path, body, stream, started, reason="ood")
        return None

    def _score(self, texts: list[str]):
        with self._ood_lock:
            t0 = time.perf_counter()
            scores = self.ood_scorer.score(texts)
            self.metrics.record_ood_scoring(time.perf_counter() - t0)
        return scores

    def decide(self, gens: Sequence[Generation]) -> str:
        """``"student"`` when every choice is confident, else ``"teacher"`` (an empty answer has no signal).

        The OOD half of the router was applied by `screen` before the student ran."""
        for g in gens:
            tops = g.completion.top_logprobs
            if not tops or any(len(row) == 0 for row in tops):
                return "teacher"
            if not self.router.confident(confidence_signals(tops)):
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

    async def forward(
        self, path: str, body: dict[str, Any], stream: bool, started: float, *, reason: str = "confidence"
    ) -> Response:
        """POST the client's body to the fallback's ``path``; its response as-is, or a 502.

        ``reason`` (one of `REASONS`) is counted in ``/metrics`` and sent back in the
        ``x-distill-route-reason`` header."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self._verify)
        if self.fallback_model is not None:
            body = {**body, "model": self.fallback_model}
        request = self._client.build_request(
            "POST", self.fallback_url + path, json=body, headers=self._headers
        )
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as err:
            why = f"{type(err).__name__} reaching {self.fallback_url + path}"
            return self._failed(started, why, reason)
        if upstream.status_code != 200:
            await upstream.aclose()
            return self._failed(
                started, f"HTTP {upstream.status_code} from {self.fallback_url + path}", reason
            )
        headers = {ROUTE_HEADER: "teacher", REASON_HEADER: reason}
        media_type = upstream.headers.get("content-type", "application/json")
        self.metrics.record("teacher", time.perf_counter() - started, reason=reason)
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
                reason,
                counted=True,
            )
        finally:
            await upstream.aclose()
        return Response(content=content, media_type=media_type, headers=headers)

    def _failed(self, started: float, why: str, reason: str, *, counted: bool = False) -> Response:
        # ``why`` names the URL and the error type only: never headers, so never the key.
        log.warning("fallback failed: %s", why)
        if counted:  # already counted as a teacher answer once the headers had arrived
            with self.metrics._lock:
                self.metrics.fallback_errors += 1
        else:
            self.metrics.record("teacher", time.perf_counter() - started, failed=True, reason=reason)
        msg = f"the router sent this request to the fallback teacher, which failed: {why}"
        response = error_response(APIError(msg, status=502, code="fallback_failed"))
        response.headers[ROUTE_HEADER] = "teacher"
        response.headers[REASON_HEADER] = reason
        return response

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def request_texts(path: str, body: dict[str, Any]) -> list[str]:
    """The texts an OOD scorer sees for one (already validated) request body: each prompt of a
    ``/completions`` request, or a chat's messages as ``"role: content"`` lines.

    This is `distill.workload.embed.row_text` on the request as an input row (``{"prompt": ...}`` or
    ``{"messages": [...]}``), exactly as ``distill route fit`` formats its inputs when it scores them
    to calibrate the cut-off, so a request is scored in the form its threshold was chosen on."""
    from distill.workload.embed import row_text

    if path == "/chat/completions":
        return [row_text({"messages": body["messages"]}, "messages", "request")]
    prompt = body["prompt"]
    return [
        row_text({"prompt": p}, "prompt", "request")
        for p in ([prompt] if isinstance(prompt, str) else prompt)
    ]


def _load_scorer(router: Router):
    from distill.workload.coverage import OODScorer

    path = getattr(router, "ood_scorer_path_", None)
    if path is None:
        raise ValueError(
            "this router cuts on an out-of-distribution score but records no OOD scorer; refit it with "
            "`distill route fit --train ...` or pass ood_scorer="
        )
    try:
        return OODScorer.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--router: its OOD scorer cannot be used: {err}") from None
