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
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from distill.evaluate.signals import confidence_signals
from distill.models.base import GenerationSettings
from distill.models.hf import Generation
from distill.models.http import APIError, check_base_url
from distill.route.router import Router
from distill.serve.format import error_response
from distill.serve.metrics import LOCAL_REASONS, REASONS, ROUTES, RouteMetrics
from distill.serve.upstream import Upstream, UpstreamError

log = logging.getLogger("distill.serve")

ROUTER_TOP_K = 5
"""Top log-probabilities per token the student computes for the router (what `distill route fit` uses)."""

ROUTE_HEADER = "x-distill-routed-to"
"""Response header naming who answered: ``student`` or ``teacher``."""

REASON_HEADER = "x-distill-route-reason"
"""On teacher-routed responses: why (one of `REASONS`)."""

# RouteMetrics, REASONS and ROUTES lived here before serve/metrics.py: still importable from here.
__all__ = [
    "REASONS",
    "REASON_HEADER",
    "ROUTER_TOP_K",
    "ROUTES",
    "ROUTE_HEADER",
    "RouteMetrics",
    "RoutingPolicy",
]
__all__ += ["busy", "check_fallback_url", "load_router", "request_texts"]


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


def check_fallback_url(url: str, flag: str = "--fallback", key_flag: str = "--fallback-api-key-env") -> str:
    """The base URL without a trailing slash; a clear error naming ``flag`` otherwise (also for a
    URL carrying credentials: keys come from the variable ``key_flag`` names)."""
    return check_base_url(url, flag, key_flag)


class RoutingPolicy:
    """What `distill.serve.build_app` (and the gateway, `distill.serve.gateway`) need to route:
    settings for the student, the decision, the forwarding to the fallback, and the metrics.

    ``fallback_url``: OpenAI base URL of the teacher (``…/v1``); ``fallback_api_key``: sent as a
    Bearer token, never logged; ``fallback_model``: replaces the request's ``model`` field when
    forwarding (servers such as vLLM check it); ``timeout``: seconds per fallback call (connect
    plus the whole answer; for a streamed answer, until its headers and then between chunks);
    ``max_inflight``: fallback calls at once (above it the client gets 429 with ``Retry-After``;
    None: no cap); ``fallback_ca_bundle``: a PEM file of CA certificates trusted (instead of the
    system store) for an https fallback behind a private CA; without it the system store, which
    honours ``SSL_CERT_FILE``. Verification is never turned off.
    ``ood_scorer``: a fitted `distill.workload.coverage.OODScorer` for a router with an OOD cut-off; by
    default the one the router file records (``router.ood_scorer_path_``) is loaded here and
    warmed up once, so a missing or broken scorer fails at start, not on the first request.
    ``reasons``: the teacher reasons counted in ``/metrics`` (`LOCAL_REASONS` for a local student).
    """

    def __init__(
        self,
        router: Router,
        fallback_url: str,
        *,
        fallback_api_key: str | None = None,
        fallback_model: str | None = None,
        timeout: float = 120.0,
        max_inflight: int | None = None,
        ood_scorer: Any = None,
        fallback_ca_bundle: str | None = None,
        reasons: tuple[str, ...] = LOCAL_REASONS,
    ) -> None:
        self.router = router
        self.fallback_url = check_fallback_url(fallback_url)
        self.fallback = Upstream(
            self.fallback_url,
            api_key=fallback_api_key,
            timeout=timeout,
            max_inflight=max_inflight or 1 << 30,
            ca_bundle=fallback_ca_bundle,
            where="--fallback-ca-bundle",
            name="teacher",
        )
        self.fallback_model = fallback_model
        self.timeout = timeout
        self.metrics = RouteMetrics(router.teacher_cost, router.student_cost, reasons=reasons)
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

    def decide_rows(self, choices: Sequence[Sequence[Sequence[float]] | None]) -> str:
        """``"student"`` when every choice is confident, else ``"teacher"``.

        ``choices``: per choice, its ``(T, k)`` top log-probabilities (rows most probable first), or
        None when the answer carries none. Rows are cut to `ROUTER_TOP_K`, the k ``route fit``
        measures with (the entropy signal depends on k). An empty answer has no signal: teacher.
        The OOD half of the router was applied by `screen` before the student ran."""
        for tops in choices:
            if not tops or any(len(row) == 0 for row in tops):
                return "teacher"
            rows = [row[:ROUTER_TOP_K] for row in tops]
            if not self.router.confident(confidence_signals(rows)):
                return "teacher"
        return "student"

    def decide(self, gens: Sequence[Generation]) -> str:
        """`decide_rows` on local generations."""
        return self.decide_rows([g.completion.top_logprobs for g in gens])

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

    def student_reply(self, reply: Any, started: float, usage: dict | None = None) -> Response:
        """The student's answer (a dict or a streaming response) with the route header; counted
        (with ``usage``, or the dict's own ``usage``)."""
        if isinstance(reply, dict):
            usage = reply.get("usage")
        response = reply if isinstance(reply, Response) else JSONResponse(reply)
        response.headers[ROUTE_HEADER] = "student"
        self.metrics.record("student", time.perf_counter() - started, usage=usage)
        return response

    async def forward(
        self, path: str, body: dict[str, Any], stream: bool, started: float, *, reason: str = "confidence"
    ) -> Response:
        """POST the client's body to the fallback's ``path``; its response as-is, a 429 when
        ``max_inflight`` calls are already out, or a 502.

        ``reason`` (one of `REASONS`) is counted in ``/metrics`` and sent back in the
        ``x-distill-route-reason`` header. A streamed answer's server-sent events pass through as
        they arrive (its tokens count when it carries a usage chunk)."""
        if not self.fallback.try_acquire():
            self.fallback.rejected += 1
            return busy(f"the fallback teacher ({self.fallback.max_inflight})")
        if self.fallback_model is not None:
            body = {**body, "model": self.fallback_model}
        url = self.fallback_url + path
        try:
            reply, pieces = await self.fallback.stream("POST", path, json.dumps(body).encode())
        except UpstreamError as err:
            self.fallback.release()
            return self._failed(started, str(err), reason)
        if reply.status != 200:
            await pieces.aclose()
            self.fallback.release()
            return self._failed(started, f"HTTP {reply.status} from {url}", reason)
        headers = {ROUTE_HEADER: "teacher", REASON_HEADER: reason}
        media_type = reply.headers.get("content-type", "application/json")
        if stream:  # pass the teacher's server-sent events through as they come
            self.metrics.record("teacher", time.perf_counter() - started, reason=reason)
            return StreamingResponse(
                self._relay(pieces),
                media_type=media_type,
                headers=headers,
                background=BackgroundTask(self._end_stream, pieces),
            )
        try:
            content = b"".join([p async for p in pieces])
        except UpstreamError as err:
            return self._failed(started, str(err), reason)
        finally:
            self.fallback.release()
        self.metrics.record("teacher", time.perf_counter() - started, reason=reason, usage=_usage(content))
        return Response(content=content, media_type=media_type, headers=headers)

    async def _relay(self, pieces):
        """The teacher's event stream, unchanged; its usage chunk (if any) is counted on the way."""
        tail = b""
        try:
            async for piece in pieces:
                tail = _scan_usage(tail + piece, self.metrics)  # before it is sent: counted when seen
                yield piece
        except UpstreamError as err:  # headers are sent: all that is left is to end the stream
            log.warning("fallback stream failed: %s", err)
            self.metrics.record_fallback_error()

    async def _end_stream(self, pieces) -> None:
        await pieces.aclose()  # also when the client went away mid-stream
        self.fallback.release()

    def _failed(self, started: float, why: str, reason: str) -> Response:
        # ``why`` names the URL and the error type only: never headers, so never the key.
        log.warning("fallback failed: %s", why)
        self.metrics.record("teacher", time.perf_counter() - started, failed=True, reason=reason)
        msg = f"the router sent this request to the fallback teacher, which failed: {why}"
        response = error_response(APIError(msg, status=502, code="fallback_failed"))
        response.headers[ROUTE_HEADER] = "teacher"
        response.headers[REASON_HEADER] = reason
        return response

    async def aclose(self) -> None:
        await self.fallback.aclose()


RETRY_AFTER_SECONDS = 1
"""``Retry-After`` of a 429 answered because an upstream has ``max_inflight`` requests out."""


def busy(what: str) -> Response:
    """429 with ``Retry-After``: ``what`` (an upstream, its cap) has its ``max_inflight`` requests out."""
    msg = f"too many requests in flight to {what}; retry shortly"
    response = error_response(APIError(msg, status=429, code="rate_limit_exceeded"))
    response.headers["retry-after"] = str(RETRY_AFTER_SECONDS)
    return response


def _usage(content: bytes) -> dict | None:
    try:
        data = json.loads(content)
    except ValueError:
        return None
    return data.get("usage") if isinstance(data, dict) else None


def _scan_usage(buffer: bytes, metrics: RouteMetrics) -> bytes:
    """Count the usage of complete ``data:`` lines in ``buffer`` that carry one; returns the
    incomplete last line (kept for the next piece)."""
    *lines, rest = buffer.split(b"\n")
    for line in lines:
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = _usage(line[5:])
            if usage:
                metrics.record_tokens("teacher", usage)
    return rest[-65536:]  # a line longer than this carries no usage worth keeping


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
