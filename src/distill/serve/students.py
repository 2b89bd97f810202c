"""The gateway's student side: replicas of one OpenAI-compatible student endpoint, each behind a
circuit breaker, shared round-robin (as `distill generate` shares teacher replicas), and the
reading of the router's signal from the student's JSON answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from distill.models.http import _error_text, _scrubber
from distill.serve.routing import ROUTER_TOP_K
from distill.serve.upstream import Upstream, UpstreamError

log = logging.getLogger("distill.serve")

CLIENT_ERRORS = frozenset({400, 413, 422})
"""Student statuses that mean "this request is invalid" (e.g. a prompt too long for the student's
context): passed back to the client, neither forwarded to the teacher nor counted as a failure."""


class Breaker:
    """A circuit breaker: closed until ``failures`` calls in a row fail, then open (nothing is sent)
    for ``cooldown`` seconds, then half-open: one probe call goes through; its success closes the
    breaker, its failure opens it for another ``cooldown``. Per process, like every other counter:
    N gateways each learn on their own that a student is down (after ``failures`` calls each)."""

    def __init__(self, failures: int = 5, cooldown: float = 10.0, clock=time.monotonic) -> None:
        if int(failures) < 1:
            raise ValueError(f"--breaker-failures must be >= 1, got {failures!r}")
        if not cooldown > 0:
            raise ValueError(f"--breaker-cooldown must be > 0 seconds, got {cooldown!r}")
        self.failures, self.cooldown, self._clock = int(failures), float(cooldown), clock
        self.in_a_row = 0
        self.opened_at: float | None = None
        self.probing = False
        self.trips = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (cool-down over: the next call is a probe)."""
        if self.opened_at is None:
            return "closed"
        return "open" if self.probing or self._clock() - self.opened_at < self.cooldown else "half_open"

    def available(self) -> bool:
        return self.state != "open"

    def enter(self) -> None:
        """A call is being sent (after `available`): in half-open state it is the one probe."""
        if self.opened_at is not None:
            self.probing = True

    def abandon(self) -> None:
        """A call ended with neither success nor failure (cancelled): if it was the probe, the next
        call may probe instead."""
        self.probing = False

    def success(self) -> None:
        self.in_a_row, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.in_a_row += 1
        if self.probing or (self.opened_at is None and self.in_a_row >= self.failures):
            self.trips += self.opened_at is None
            self.opened_at, self.probing = self._clock(), False


class StudentFailed(Exception):
    """The student endpoint failed on one request (the message names the URL, never a header)."""


class StudentRejected(Exception):
    """The student refused the request as invalid (`CLIENT_ERRORS`): ``status``, ``body`` to pass on."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.body = status, body


class Replica:
    """One student URL: its `Upstream`, its `Breaker`, its error count, its model name."""

    def __init__(self, upstream: Upstream, breaker: Breaker, model: str | None) -> None:
        self.upstream, self.breaker, self.model = upstream, breaker, model
        self.errors = 0

    @property
    def name(self) -> str:
        return self.upstream.name


BUSY = "busy"


class StudentPool:
    """Replicas of one student, each an `Upstream` (``timeout``, ``max_inflight``, ``api_key``,
    ``ca_bundle``) with its own `Breaker`. ``model``: the name put in requests (None: each
    replica's ``/v1/models`` is asked once, on its first request; vLLM checks the name)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_inflight: int = 128,
        ca_bundle: str | None = None,
        model: str | None = None,
        breaker_failures: int = 5,
        breaker_cooldown: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("the gateway needs at least one student URL")
        self.replicas = [
            Replica(
                Upstream(
                    url,
                    api_key=api_key,
                    timeout=timeout,
                    max_inflight=max_inflight,
                    ca_bundle=ca_bundle,
                    where="--student-ca-bundle",
                    name=f"student-{i}",
                ),
                Breaker(breaker_failures, breaker_cooldown),
                model,
            )
            for i, url in enumerate(urls)
        ]
        self._scrub = _scrubber(api_key or "")
        self._next = 0
        self.max_inflight = max_inflight
        self.rejected = 0  # requests answered 429 because every available replica was full

    def __repr__(self) -> str:
        return f"StudentPool({[r.upstream.url for r in self.replicas]!r})"

    def acquire(self) -> Replica | str | None:
        """The next replica with a closed (or probing) breaker and a free slot, round-robin; `BUSY`
        when every such replica is full (the caller answers 429); None when every breaker is open."""
        n, open_ = len(self.replicas), 0
        for i in range(n):
            r = self.replicas[(self._next + i) % n]
            if not r.breaker.available():
                open_ += 1
            elif r.upstream.try_acquire():
                r.breaker.enter()
                self._next = (self._next + i + 1) % n
                return r
        return None if open_ == n else BUSY

    async def ask(self, replica: Replica, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The student's JSON answer to ``body`` (sent non-streamed); releases the slot.

        Raises `StudentRejected` for `CLIENT_ERRORS` (the endpoint answered: a success for the
        breaker) and `StudentFailed` for everything else that is not a 200 with well-formed
        ``choices`` (a failure for the breaker)."""
        up = replica.upstream
        try:
            if replica.model is None:
                replica.model = await self._model_name(up)
            reply = await up.request("POST", path, json.dumps({**body, "model": replica.model}).encode())
            if reply.status in CLIENT_ERRORS:  # the endpoint works; the request was bad
                replica.breaker.success()
                raise StudentRejected(
                    reply.status, self._scrub(reply.body.decode("utf-8", "replace")).encode()
                )
            if reply.status != 200:
                why = self._scrub(_error_text(reply.body))[:200]
                raise StudentFailed(f"HTTP {reply.status} from {up.url}{path}: {why}")
            try:
                data = json.loads(reply.body)
            except ValueError:
                data = None
            if not _well_formed(data, chat=path == "/chat/completions"):
                raise StudentFailed(f"malformed answer from {up.url}{path}")
        except UpstreamError as err:
            self._failed(replica, str(err))
            raise StudentFailed(str(err)) from None
        except StudentFailed as err:
            self._failed(replica, str(err))
            raise
        except StudentRejected:
            raise
        except BaseException:  # cancelled (the client went away): a probe that never ended frees the way
            replica.breaker.abandon()
            raise
        finally:
            up.release()
        replica.breaker.success()
        return data

    def _failed(self, replica: Replica, why: str) -> None:
        replica.errors += 1
        was = replica.breaker.state
        replica.breaker.failure()
        log.warning("student %s failed: %s", replica.name, why)
        if was != "open" and replica.breaker.state == "open":
            log.warning("student %s: circuit breaker open for %g s", replica.name, replica.breaker.cooldown)

    async def _model_name(self, up: Upstream) -> str:
        reply = await up.request("GET", "/models")
        try:
            names = [c["id"] for c in json.loads(reply.body)["data"]] if reply.status == 200 else []
        except (ValueError, KeyError, TypeError):
            names = []
        if not names or not isinstance(names[0], str):
            raise StudentFailed(f"{up.url}/models names no model (HTTP {reply.status}); pass --student-model")
        return names[0]

    async def aclose(self) -> None:
        for r in self.replicas:
            await r.upstream.aclose()


def _well_formed(data: Any, *, chat: bool) -> bool:
    """A JSON object with a non-empty ``choices`` list of choices holding their text."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        return False
    if chat:
        return all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
    return all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices)


def choice_rows(choice: dict[str, Any], chat: bool) -> list[list[float]] | None:
    """``(T, k)`` top log-probabilities of one choice of an OpenAI answer, None when it has none.

    distill's ``top_token_logprobs`` first (exact), else chat's ``logprobs.content[].top_logprobs``,
    else the legacy completions dicts (``{text: logprob}``). In those dicts ids with the same text
    collapse into one entry that keeps the *last* value (vLLM without ``return_tokens_as_token_ids``):
    the chosen token's own value can be replaced by a less likely token's, which lowered the
    confidence signal (seen with a real vLLM student: 9 of 10 prompts, one routed wrongly). So each
    legacy row starts with the chosen token's own ``token_logprobs`` value, followed by the dict's
    other entries (its entry under the chosen text is dropped only when it holds that same value)."""
    try:
        rows = choice.get("top_token_logprobs")
        if rows is None:
            lp = choice.get("logprobs") or {}
            if chat:
                rows = [[e["logprob"] for e in tok["top_logprobs"]] for tok in lp.get("content") or []]
            else:
                dicts = lp.get("top_logprobs") or []
                chosen, tokens = lp.get("token_logprobs"), lp.get("tokens")
                if (
                    isinstance(chosen, list)
                    and isinstance(tokens, list)
                    and len(chosen) == len(dicts) == len(tokens)
                ):
                    rows = [
                        [c, *(v for t, v in d.items() if not (t == tok and float(v) == float(c)))]
                        for c, tok, d in zip(chosen, tokens, dicts)
                    ]
                else:
                    rows = [list(d.values()) for d in dicts]
        return [[float(v) for v in row] for row in rows] or None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def trim_for_client(data: dict[str, Any], chat: bool, k: int | None) -> dict[str, Any]:
    """The student's answer with the top-k the router asked for (at least `ROUTER_TOP_K`) cut back
    to the client's ``k`` (None: the client asked for no log-probabilities). In place."""
    for c in data["choices"]:
        if not isinstance(c, dict):
            continue
        if k is None:
            c["logprobs"] = None
            c.pop("top_token_ids", None)
            c.pop("top_token_logprobs", None)
            continue
        lp = c.get("logprobs")
        if isinstance(lp, dict) and chat:
            for tok in lp.get("content") or []:
                if isinstance(tok, dict) and isinstance(tok.get("top_logprobs"), list):
                    tok["top_logprobs"] = tok["top_logprobs"][:k]
        elif isinstance(lp, dict) and isinstance(lp.get("top_logprobs"), list):
            # Rank order is the dicts' order; two top ids with one text share a key (see choice_rows).
            lp["top_logprobs"] = [
                dict(list(d.items())[:k]) if isinstance(d, dict) else d for d in lp["top_logprobs"]
            ]
        for key in ("top_token_ids", "top_token_logprobs"):
            if isinstance(c.get(key), list):
                c[key] = [row[:k] if isinstance(row, list) else row for row in c[key]]
    return data


def student_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """The client's body as sent to the student: not streamed (the decision needs the whole answer),
    with at least `ROUTER_TOP_K` top log-probabilities per token."""
    out = {key: v for key, v in body.items() if key not in ("stream", "stream_options")}
    if chat:
        out["logprobs"] = True
        out["top_logprobs"] = max(int(body.get("top_logprobs") or 0), ROUTER_TOP_K)
    else:
        out["logprobs"] = max(int(body.get("logprobs") or 0), ROUTER_TOP_K)
    return out
