"""The counters behind ``/metrics`` of a routing `distill serve` (local student or gateway), written
in Prometheus text format. Counters only: N processes behind a load balancer are summed by
Prometheus (``sum by (route) (...)``), so they behave as one.
"""

from __future__ import annotations

import dataclasses
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the latency histogram buckets in ``/metrics``."""

ROUTES = ("student", "teacher")

REASONS = ("confidence", "ood", "student_error", "circuit_open")
"""Why a request went to the teacher: the student's signal was below the threshold; the request
scored above the router's out-of-distribution cut-off; the student endpoint failed on this request
(gateway); or every student endpoint's circuit breaker is open (gateway: the student is not asked)."""

LOCAL_REASONS = REASONS[:2]
"""The reasons a server with the student in process can have."""

NOT_RUN = frozenset({"ood", "circuit_open"})
"""Reasons for which the student never ran on the request (so it cost nothing)."""


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
    student pays ``student_cost`` on every request it runs on (it answers first), and a request it
    keeps avoids ``teacher_cost``. So the saving against "teacher only" is
    ``(n_student * teacher_cost - n_ran * student_cost) / 1e6`` where ``n_ran`` is every request but
    those the student never ran on (reasons in `NOT_RUN`); it can be negative.
    ``reasons``: the teacher reasons this server can have (each gets a line, zero or not).
    """

    def __init__(
        self, teacher_cost: float, student_cost: float, *, reasons: tuple[str, ...] = LOCAL_REASONS
    ) -> None:
        unknown = [r for r in reasons if r not in REASONS]
        if unknown:
            raise ValueError(f"unknown routing reasons {unknown}; known: {REASONS}")
        self.teacher_cost, self.student_cost = float(teacher_cost), float(student_cost)
        self.requests = dict.fromkeys(ROUTES, 0)
        self.teacher_reasons = dict.fromkeys(reasons, 0)
        self.latency = {r: _Histogram() for r in ROUTES}
        self.tokens = {(r, kind): 0 for r in ROUTES for kind in ("prompt", "completion")}
        self.fallback_errors = 0
        self.ood_seconds, self.ood_scored = 0.0, 0
        self._lock = threading.Lock()

    def record(
        self,
        route: str,
        seconds: float,
        *,
        failed: bool = False,
        reason: str | None = None,
        usage: dict | None = None,
    ) -> None:
        """One answered request; ``reason`` (one of ``reasons``) for teacher-routed ones; ``usage``
        the response's OpenAI ``usage`` object when known."""
        with self._lock:
            self.requests[route] += 1
            self.latency[route].observe(seconds)
            self.fallback_errors += int(failed)
            if route == "teacher":
                self.teacher_reasons[reason or "confidence"] += 1
        if usage:
            self.record_tokens(route, usage)

    def record_tokens(self, route: str, usage: dict) -> None:
        """Add an OpenAI ``usage`` object's ``prompt_tokens`` and ``completion_tokens`` (ignores junk)."""
        counts = []
        for kind in ("prompt", "completion"):
            n = usage.get(f"{kind}_tokens") if isinstance(usage, dict) else None
            counts.append(n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0)
        with self._lock:
            self.tokens[(route, "prompt")] += counts[0]
            self.tokens[(route, "completion")] += counts[1]

    def record_fallback_error(self) -> None:
        """A teacher answer already counted whose body then failed."""
        with self._lock:
            self.fallback_errors += 1

    def record_ood_scoring(self, seconds: float) -> None:
        with self._lock:
            self.ood_seconds += seconds
            self.ood_scored += 1

    def cost_saved(self) -> float:
        n_ran = sum(self.requests.values()) - sum(self.teacher_reasons.get(r, 0) for r in NOT_RUN)
        return (self.requests["student"] * self.teacher_cost - n_ran * self.student_cost) / 1e6

    def render(self, extra: list[str] = ()) -> str:
        """Prometheus text; ``extra`` lines (already formatted) are appended."""
        with self._lock:
            lines = [
                "# HELP distill_requests_total Requests answered, by who answered (failed fallbacks count as teacher).",
                "# TYPE distill_requests_total counter",
            ]
            lines += [f'distill_requests_total{{route="{r}"}} {self.requests[r]}' for r in ROUTES]
            lines += [
                "# HELP distill_teacher_requests_total Requests routed to the teacher, by reason: "
                + "; ".join(_REASON_HELP[r] for r in self.teacher_reasons)
                + ".",
                "# TYPE distill_teacher_requests_total counter",
            ]
            lines += [
                f'distill_teacher_requests_total{{reason="{r}"}} {n}' for r, n in self.teacher_reasons.items()
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
                "# HELP distill_tokens_total Tokens in answered requests' usage, by route and kind "
                "(teacher streams count only when they carry a usage chunk).",
                "# TYPE distill_tokens_total counter",
            ]
            lines += [
                f'distill_tokens_total{{route="{r}",kind="{k}"}} {n}' for (r, k), n in self.tokens.items()
            ]
            lines += [
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
                "requests the student never ran on pay no student cost.",
                "# TYPE distill_estimated_cost_saved gauge",
                f"distill_estimated_cost_saved {self.cost_saved():.9g}",
            ]
        return "\n".join([*lines, *extra]) + "\n"


_REASON_HELP = {
    "confidence": "the student was not confident",
    "ood": "the input scored out of distribution (the student did not run)",
    "student_error": "the student endpoint failed on the request",
    "circuit_open": "every student endpoint's circuit breaker was open (the student was not asked)",
}
